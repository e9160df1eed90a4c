#!/bin/sh
# Print the photo training data of the models trained on every photo source (natural stage 5, grey), one path
# per line, from the shared data folder $1 (default ../shared/data): CID22 training and validation, the CLIC 2025
# crops after the first 27, then the native-resolution validation split of docs/MODELS.md (the first 27 CLIC
# crops in sorted order: all 3 crops of 9 photos) last, so that a config's val_images = 27 holds it out.
set -e
D=${1:-../shared/data}
for d in "$D/cid22/training" "$D/cid22/validation" "$D/clic2025-validation"; do
    [ -d "$d" ] || { echo "photo_data.sh: no folder $d" >&2; exit 1; }
done
CLIC=$(ls "$D"/clic2025-validation/*.webp | sort)
echo "$D/cid22/training"
echo "$D/cid22/validation"
echo "$CLIC" | tail -n +28
echo "$CLIC" | head -27
