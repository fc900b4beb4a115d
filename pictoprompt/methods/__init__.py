"""The papers' methods: tensors and model handles in, tensors and images out."""
