"""Backbones: a registry of named specs and one adapter per source library."""
from .base import POOLINGS, Backbone, LoadOptions
from .registry import REFERENCE, BackboneSpec, load_backbone, resolve, spec_table

__all__ = ["POOLINGS", "REFERENCE", "Backbone", "BackboneSpec", "LoadOptions", "load_backbone", "resolve",
           "spec_table"]
