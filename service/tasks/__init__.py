"""Task-specific serving logic; importing this package registers every task."""

from . import image_classification  # noqa: F401
from . import sentiment  # noqa: F401
