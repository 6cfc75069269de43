#!/data/data/com.termux/files/usr/bin/bash
# Set up tcl on Android in Termux (Adreno or Mali GPU). Run once: bash scripts/termux-setup.sh
set -euo pipefail

pkg update -y
pkg install -y python python-numpy python-pillow clang ocl-icd opencl-headers clinfo libyaml

# pyopencl has no Android wheels: build it from source against Termux's OpenCL headers and ICD loader.
pip install --no-binary pyopencl pyopencl
# tcl itself (PoCL is skipped on aarch64 by an environment marker).
pip install ".[h5,onnx]"

# The vendor OpenCL library. Adreno's libOpenCL.so is not an ICD: it is loaded directly, so it must come first on
# LD_LIBRARY_PATH; Mali drivers may live under egl/; older devices use /system/vendor/lib64.
for d in /vendor/lib64 /vendor/lib64/egl /system/vendor/lib64; do
  if [ -e "$d/libOpenCL.so" ] || [ -e "$d/libGLES_mali.so" ]; then
    line="export LD_LIBRARY_PATH=$d:\$PREFIX/lib"
    echo "Found a vendor OpenCL library in $d; add this line to ~/.bashrc:"
    echo "  $line"
    eval "$line"
    break
  fi
done
tcl doctor || echo "tcl doctor found a problem: read its fix lines above."
