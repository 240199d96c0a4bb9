"""Backbones: a registry of named specs and one adapter per source library."""
from .base import POOLINGS, Backbone, LoadOptions, Placement, Preprocessing, split_size
from .registry import (
    REFERENCE,
    SOURCES,
    BackboneSpec,
    download_weights,
    list_backbones,
    load_backbone,
    load_preprocessing,
    resolve,
    spec_table,
)
from .text import PROMPT_TEMPLATES, clean_class_name, text_embeddings
from .variants import Variant, expand_names, split_name

__all__ = ["POOLINGS", "PROMPT_TEMPLATES", "REFERENCE", "SOURCES", "Backbone", "BackboneSpec", "LoadOptions",
           "Placement", "Preprocessing", "Variant", "clean_class_name", "download_weights", "expand_names",
           "list_backbones", "load_backbone", "load_preprocessing", "resolve", "spec_table", "split_name",
           "split_size", "text_embeddings"]
