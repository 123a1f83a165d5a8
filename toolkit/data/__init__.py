"""Episodes and pairs on disk: layouts, importers, datasets."""
