"""A run's room: its directory on disk (``directory``: layout, stage, manifest, publish and
overwrite rules), its checkpoint file (``checkpoint``), and loading a finished run (``loading``:
``load_run``, the one loader evaluate, compare, serving and export use, and the model and data
builders training's start and resume share with it)."""
