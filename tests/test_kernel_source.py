"""The kernel sources stay standard OpenCL C 1.2 (issue 18): no vector access through pointer casts, no attributes
beyond one performance hint that only PoCL builds see, and the same vector-access block in every file that uses it.
Plain text checks, no OpenCL needed."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(ROOT, "kernels")
FILES = sorted(f for f in os.listdir(KDIR) if f.endswith(".cl"))

SCALARS = r"(?:char|uchar|short|ushort|int|uint|long|ulong|half|float|double)"
VECTOR = SCALARS + r"(?:2|3|4|8|16)"
SPACES = r"(?:__global|__local|__private|__constant|global|local|private|constant)"
# A cast to a pointer to a vector type: (__global const float8*), (float16 *), (const __local int4*) ...
VECTOR_PTR_CAST = re.compile(r"\(\s*(?:const\s+|volatile\s+|" + SPACES + r"\s+)*" + VECTOR
                             + r"\s*(?:const\s*)?\*+\s*\)")
# Any typedef of a vector type (its name would hide a pointer cast from the pattern above).
TYPEDEF = re.compile(r"\btypedef\s+(?:const\s+)?(" + VECTOR + r"|CAT\s*\(\s*" + SCALARS + r"\s*,[^)]*\))\s+(\w+)")
# The one attribute allowed: a Clang vectorisation hint, defined only under the PoCL build guard.
ALLOWED_ATTRIBUTE = "__attribute__((min_vector_width(512)))"


def _code(path):
    """The file's text without comments (so that prose about the old patterns does not trip the checks)."""
    with open(path) as f:
        s = f.read()
    s = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), s, flags=re.S)
    return re.sub(r"//[^\n]*", "", s)


def _lines(text, pattern):
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in re.finditer(pattern, text)]


def test_kernel_files_found():
    assert {"gemm.cl", "conv.cl", "batchnorm.cl", "elementwise.cl", "pool.cl", "optim.cl", "tensor.cl"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_no_pointer_cast_vector_access(name):
    """Vectors are loaded and stored with vloadN / vstoreN (the VLDn / VSTn macros), never through a pointer cast to
    a vector type: that needs the vector's full alignment in OpenCL C, and a vendor compiler may reject it or emit
    slow or faulting accesses at unaligned offsets."""
    code = _code(os.path.join(KDIR, name))
    bad = _lines(code, VECTOR_PTR_CAST)
    for m in TYPEDEF.finditer(code):
        alias = m.group(2)
        bad += _lines(code, r"\(\s*(?:const\s+|" + SPACES + r"\s+)*" + re.escape(alias) + r"\s*(?:const\s*)?\*+\s*\)")
    assert not bad, f"kernels/{name}: pointer-cast vector access (use VLDn/VSTn, i.e. vloadN/vstoreN): {bad}"


@pytest.mark.parametrize("name", FILES)
def test_no_attributes(name):
    """No __attribute__ (aligned typedefs are a Clang extension) except the PoCL-only min_vector_width hint, and that
    only inside a macro definition guarded by TCL_POCL or MINVEC (so no other compiler ever sees it)."""
    code = _code(os.path.join(KDIR, name))
    lines = code.split("\n")
    bad = []
    for i, line in enumerate(lines):
        if "__attribute__" not in line:
            continue
        rest = line.replace(ALLOWED_ATTRIBUTE, "")
        if "__attribute__" in rest or not line.lstrip().startswith("#define"):
            bad.append(f"line {i + 1}: {line.strip()}")
            continue
        guard = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].lstrip().startswith("#if")), "")
        if not re.search(r"\b(TCL_POCL|MINVEC)\b", guard) or "__clang__" not in guard:
            bad.append(f"line {i + 1}: {line.strip()} (not under #if ... TCL_POCL/MINVEC ... __clang__)")
    assert not bad, f"kernels/{name}: attributes outside standard OpenCL C: {bad}"


def _vector_block(text):
    start = text.find("// --- Vector access (")
    end = text.find("// --- end of vector access ---")
    return None if start < 0 or end < 0 else text[start:end]


def test_vector_access_block_is_shared():
    """Every file that uses VLDn/VSTn carries the same definition block (each file builds on its own)."""
    blocks = {}
    for name in FILES:
        with open(os.path.join(KDIR, name)) as f:
            text = f.read()
        uses = re.search(r"\bV(LD|ST)(4|8|16)\s*\(", _code(os.path.join(KDIR, name)).replace(
            _vector_block(text) or "\0", ""))
        block = _vector_block(text)
        if uses:
            assert block is not None, f"kernels/{name} uses VLDn/VSTn without the vector-access block"
        if block is not None:
            blocks[name] = block
    assert blocks, "no kernel file has the vector-access block"
    first = next(iter(blocks.values()))
    differ = [n for n, b in blocks.items() if b != first]
    assert not differ, f"the vector-access block differs in {differ}: copy it from kernels/gemm.cl"
    # The portable branch uses the built-ins; the PoCL branch only plain indexing.
    portable = first.split("#else", 1)[1]
    assert all(f"vload{n}(0, p)" in portable and f"vstore{n}(v, 0, p)" in portable for n in (4, 8, 16))
    assert "vload" not in first.split("#else", 1)[0].split("#if", 1)[1]
