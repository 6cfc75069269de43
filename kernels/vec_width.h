// `vec`: VW floats (float when VW = 1, else floatVW) for kernels built once per channel vector width VW, with
// LD / ST through vector_access.h's VLDn / VSTn, ZERO_UNLESS(c, v) (v where c holds, else exact zeros: a bit mask,
// no branch around a load) and KATTR (with MINVEC, on PoCL: keep float16 in single 512-bit registers).
// Needs vector_access.h first.
#ifndef CAT
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#endif
#ifndef VW
#define VW 1
#endif
#if VW == 1
typedef float vec;
#define LD(p) (*(p))
#define ST(p, v) (*(p) = (v))
#define ZERO_UNLESS(c, v) as_float(as_int(v) & -(int)(c))
#else
typedef CAT(float, VW) vec;
#define LD(p) CAT(VLD, VW)(p)
#define ST(p, v) CAT(VST, VW)(p, v)
#define ZERO_UNLESS(c, v) CAT(as_float, VW)(CAT(as_int, VW)(v) & -(int)(c))
#endif
#if defined(MINVEC) && MINVEC && defined(__clang__)
#define KATTR __attribute__((min_vector_width(512)))
#else
#define KATTR
#endif
