"""The embedded demo model: generated pictures, the vision training recipe, the build."""
