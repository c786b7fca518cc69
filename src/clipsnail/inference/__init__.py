"""Using trained models: evaluation metrics and encoders, PixelSNAIL sampling, text to image, the captioner, the image
index, query algebra and figures. Above the models, below training and the tasks."""
