"""Notebook-first research-to-production framework for retail computer vision

Modules:

- `retail_cv.data.store`: Content-addressed, versioned datasets in the workspace: ingest once, name every version by its content, diff, read back verified, encrypted at rest when asked."""

__version__ = "0.1.0"
