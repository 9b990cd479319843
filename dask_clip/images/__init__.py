"""Image bytes -> preprocessed pixels: Pillow on the decode threads, or JPEGs on the model's device."""
