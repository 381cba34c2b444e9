"""A run's room: its directory on disk (``directory``: layout, stage, manifest, publish and
overwrite rules), its checkpoint file (``checkpoint``), and the one loader of a finished run
(``loading``) that training's resume, evaluation, compare, serving and export all use."""
