#!/usr/bin/env bash
# The main job: set up, then run the DreamBooth notebook end to end with papermill on the offline model.
# Writes outputs/01_dreambooth/ (the executed notebook, validation grids, final images, the trained model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
mkdir -p outputs/01_dreambooth
.venv/bin/python -m papermill notebooks/01_dreambooth.ipynb outputs/01_dreambooth/01_dreambooth.ipynb \
  -p MODEL offline -p OUTPUT_DIR outputs/01_dreambooth "$@"
echo "Done: open outputs/01_dreambooth/01_dreambooth.ipynb; images are in outputs/01_dreambooth/"
