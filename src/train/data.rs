//! Training data: manifests of (image, text) pairs and image preprocessing.
