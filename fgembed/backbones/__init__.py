"""Backbones: a registry of named specs and one adapter per source library."""
from .base import POOLINGS, Backbone, LoadOptions, Placement, split_size
from .registry import (
    REFERENCE,
    SOURCES,
    BackboneSpec,
    download_weights,
    list_backbones,
    load_backbone,
    resolve,
    spec_table,
)
from .text import PROMPT_TEMPLATES, clean_class_name, text_embeddings

__all__ = ["POOLINGS", "PROMPT_TEMPLATES", "REFERENCE", "SOURCES", "Backbone", "BackboneSpec", "LoadOptions",
           "Placement", "clean_class_name", "download_weights", "list_backbones", "load_backbone", "resolve",
           "spec_table", "split_size", "text_embeddings"]
