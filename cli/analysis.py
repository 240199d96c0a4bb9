"""`fgembed similarity`, `fgembed bench`: domain similarity between stores and backbone cost."""
from __future__ import annotations
