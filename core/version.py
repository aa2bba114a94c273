"""lvlmva's version, in a module of its own: the pipeline's modules read it while the package's
``__init__`` (which imports the pipeline) is still running, and a module that imports the
package for it would close an import cycle."""

__version__ = "0.1.0"
