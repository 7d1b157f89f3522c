"""gen3d_lessons: the library behind the gen3d book (3D generative models for brain and heart)."""

__version__ = "0.1.0"
