"""The Gemma 4 family's media encoders (a vision transformer today), beside the unified model's encoder-free
embedders in model/vision.py and model/audio.py."""
