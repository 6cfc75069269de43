// Vector access for every kernel file (each says `#include "vector_access.h"`; transfercl_cli/runtime.py puts this
// text in place of that line before the build, so no include path is needed, from a source tree or a wheel).
// Loads and stores of float4/8/16 at any float offset go through vloadN / vstoreN, OpenCL C's portable form (a
// pointer cast to a vector type would need the vector's full alignment). PoCL compiles those built-ins as calls
// that spill the vector registers, and its vload16 / vstore16 break where the CPU model it compiles for lacks
// AVX-512 (AMD Zen 4 under LLVM 14), so the host builds for PoCL with -DTCL_POCL=1 and each access is then written
// element by element, which LLVM merges into one vector load or store (plain OpenCL C as well).
#if defined(TCL_POCL) && TCL_POCL
#define VLD4(p) ((float4)((p)[0], (p)[1], (p)[2], (p)[3]))
#define VLD8(p) ((float8)(VLD4(p), VLD4((p) + 4)))
#define VLD16(p) ((float16)(VLD8(p), VLD8((p) + 8)))
#define VST4(p, v)                                                                                              \
    do {                                                                                                        \
        const float4 v4_ = (v);                                                                                 \
        (p)[0] = v4_.s0; (p)[1] = v4_.s1; (p)[2] = v4_.s2; (p)[3] = v4_.s3;                                     \
    } while (0)
#define VST8(p, v) do { const float8 v8_ = (v); VST4(p, v8_.lo); VST4((p) + 4, v8_.hi); } while (0)
#define VST16(p, v) do { const float16 v16_ = (v); VST8(p, v16_.lo); VST8((p) + 8, v16_.hi); } while (0)
#else
#define VLD4(p) vload4(0, p)
#define VLD8(p) vload8(0, p)
#define VLD16(p) vload16(0, p)
#define VST4(p, v) vstore4(v, 0, p)
#define VST8(p, v) vstore8(v, 0, p)
#define VST16(p, v) vstore16(v, 0, p)
#endif

// Clang's hint that a kernel may keep 512-bit vectors (PoCL builds only: no other compiler sees the attribute).
#if defined(TCL_POCL) && TCL_POCL && defined(__clang__)
#define VEC512 __attribute__((min_vector_width(512)))
#else
#define VEC512
#endif
