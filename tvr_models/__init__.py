"""Thin TVR model definitions on a transformers CLIP backbone (see SPEC "Models")."""
