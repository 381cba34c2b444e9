"""Other libraries' formats, in and out: ``interop.recbole`` (RecBole's atomic data files and the
weights its released models save).

Kept apart from ``data`` and ``models`` so that those floors know only our own formats; nothing is
imported here, so ``import mlsa4rec.interop`` costs nothing until a converter is used.
"""
