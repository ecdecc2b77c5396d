"""`digits`: a real text-to-image model trained here, on the handwritten digits scikit-learn ships,
with a quality metric that needs no download (design.md §8 lists it as the embedded default).

data.py      the 1,797 8x8 digits, upscaled to 64x64 RGB, a fixed train/held-out split, the prompts
metric.py    a digit classifier on the same data: prompt accuracy and a Fréchet distance
tokenizer.py a word-level CLIP tokenizer for the prompts' words (byte fallback for any other)
train.py     `python -m digits.train`: VAE, text encoder, UNet, then the LCM distillation (lcm.py)
"""
