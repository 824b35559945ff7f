"""Old form of `python -m nbkit class-images` (same options, same code): python tools/class_images.py --prompt ..."""
import sys

from nbkit.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["class-images", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
