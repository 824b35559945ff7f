"""Old form of `python -m nbkit class-images` (same options, same code): python tools/class_images.py --prompt ..."""
import sys

from nbkit.cli import main

sys.exit(main(["class-images", *sys.argv[1:]]))
