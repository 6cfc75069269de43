"""The kernel sources stay standard OpenCL C 1.2 (issue 18): no vector access through pointer casts, no attributes
beyond one performance hint that only PoCL builds see, and one vector-access header that every file using it includes.
Plain text checks, no OpenCL needed."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(ROOT, "kernels")
FILES = sorted(f for f in os.listdir(KDIR) if f.endswith((".cl", ".h")))

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


def test_vector_access_header_is_shared():
    """VLDn/VSTn are defined once, in kernels/vector_access.h, and every kernel file that uses them includes it (the
    runtime substitutes the header's text for the include line, so each file still builds on its own)."""
    from transfercl_cli.runtime import kernel_source

    header = open(os.path.join(KDIR, "vector_access.h")).read()
    for name in FILES:
        if not name.endswith(".cl"):
            continue
        code = _code(os.path.join(KDIR, name))
        assert not re.search(r"#define\s+V(LD|ST)(4|8|16)\b", code), f"kernels/{name} defines VLDn/VSTn itself"
        if re.search(r"\bV(LD|ST)(4|8|16)\s*\(", code):
            assert '#include "vector_access.h"' in code, f"kernels/{name} uses VLDn/VSTn without the header"
            src = kernel_source(name[:-3])
            assert header in src and not re.search(r"^#include", src, re.M), name
    # The portable branch uses the built-ins; the PoCL branch only plain indexing.
    portable = header.split("#else", 1)[1]
    assert all(f"vload{n}(0, p)" in portable and f"vstore{n}(v, 0, p)" in portable for n in (4, 8, 16))
    assert "vload" not in _code(os.path.join(KDIR, "vector_access.h")).split("#else", 1)[0].split("#if", 1)[1]
