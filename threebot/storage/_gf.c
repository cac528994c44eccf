/* GF(2^8) multiply-accumulate over byte buffers: the kernel behind ErasureCoder.decode's
 * rebuild of missing primary blocks.
 *
 * combine(coefs, inputs, outputs) computes, byte by byte,
 *     outputs[r] = XOR over j of coefs[r * len(inputs) + j] * inputs[j]
 * in GF(2^8) with zfec's field polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11D).
 *
 * Implementations (the fastest usable one is the default):
 *   gfni    AVX-512BW + GFNI: one vgf2p8affineqb per coefficient and 64 bytes, using the 8x8
 *           bit matrix of "multiply by c" (valid for any field polynomial).
 *   avx2    split-nibble: c*x = T_lo[x & 15] ^ T_hi[x >> 4], two vpshufb per 32 bytes.
 *   scalar  a 256x256 product table; portable, and used for the SIMD paths' tails.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GF_X86 1
#include <immintrin.h>
#endif

#define GF_POLY 0x11D
#define GF_MAX_ROWS 256
/* Columns per pass: each pass reads one chunk of every input once per group of output rows,
 * so with many outputs the inputs' chunks are still in cache for the next group. */
#define GF_CHUNK 8192
#define GF_GROUP 4 /* output rows accumulated in registers together */

static uint8_t gf_mul_table[256][256];

static void gf_init_tables(void)
{
    uint8_t exp[255];
    uint8_t log[256] = {0};
    unsigned x = 1;
    for (int i = 0; i < 255; i++) {
        exp[i] = (uint8_t)x;
        log[x] = (uint8_t)i;
        x <<= 1;
        if (x & 0x100)
            x ^= GF_POLY;
    }
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            gf_mul_table[a][b] = (a && b) ? exp[(log[a] + log[b]) % 255] : 0;
}

/* Everything a kernel needs; filled while holding the GIL, used without it. */
typedef struct {
    const uint8_t *coefs; /* nout x nin, row-major */
    const uint8_t **in;
    uint8_t **out;
    size_t nin, nout, len;
    uint8_t *scratch; /* nin * nout * 32 bytes for per-coefficient tables */
} gf_job;

/* Columns [start, end) of every output, one table lookup per byte. */
static void combine_scalar_range(const gf_job *job, size_t start, size_t end)
{
    size_t n = end - start;
    for (size_t r = 0; r < job->nout; r++) {
        uint8_t *o = job->out[r] + start;
        const uint8_t *row = job->coefs + r * job->nin;
        memset(o, 0, n);
        for (size_t j = 0; j < job->nin; j++) {
            const uint8_t *s = job->in[j] + start;
            const uint8_t *t = gf_mul_table[row[j]];
            if (row[j] == 0)
                continue;
            if (row[j] == 1) {
                for (size_t i = 0; i < n; i++)
                    o[i] ^= s[i];
            } else {
                for (size_t i = 0; i < n; i++)
                    o[i] ^= t[s[i]];
            }
        }
    }
}

static void combine_scalar(const gf_job *job)
{
    for (size_t start = 0; start < job->len; start += GF_CHUNK) {
        size_t end = job->len - start > GF_CHUNK ? start + GF_CHUNK : job->len;
        combine_scalar_range(job, start, end);
    }
}

#ifdef GF_X86

/* ---- AVX2 split-nibble ------------------------------------------------------------------ */

/* scratch[(r * nin + j) * 32 ..]: 16 products c*x for x = 0..15, then 16 for x = 0x00..0xF0. */
static void avx2_tables(const gf_job *job)
{
    for (size_t i = 0; i < job->nout * job->nin; i++) {
        const uint8_t *t = gf_mul_table[job->coefs[i]];
        uint8_t *dst = job->scratch + i * 32;
        for (int x = 0; x < 16; x++) {
            dst[x] = t[x];
            dst[16 + x] = t[x << 4];
        }
    }
}

__attribute__((target("avx2"), always_inline)) static inline void
avx2_rows(const gf_job *job, size_t r0, size_t rows, size_t start, size_t end)
{
    const __m256i mask = _mm256_set1_epi8(0x0f);
    for (size_t x = start; x < end; x += 32) {
        __m256i acc[GF_GROUP];
        for (size_t r = 0; r < rows; r++)
            acc[r] = _mm256_setzero_si256();
        for (size_t j = 0; j < job->nin; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(job->in[j] + x));
            __m256i lo = _mm256_and_si256(v, mask);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi64(v, 4), mask);
            for (size_t r = 0; r < rows; r++) {
                const uint8_t *t = job->scratch + ((r0 + r) * job->nin + j) * 32;
                __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t));
                __m256i thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + 16)));
                acc[r] = _mm256_xor_si256(acc[r], _mm256_shuffle_epi8(tlo, lo));
                acc[r] = _mm256_xor_si256(acc[r], _mm256_shuffle_epi8(thi, hi));
            }
        }
        for (size_t r = 0; r < rows; r++)
            _mm256_storeu_si256((__m256i *)(job->out[r0 + r] + x), acc[r]);
    }
}

__attribute__((target("avx2"))) static void combine_avx2(const gf_job *job)
{
    size_t vlen = job->len & ~(size_t)31;
    avx2_tables(job);
    for (size_t start = 0; start < vlen; start += GF_CHUNK) {
        size_t end = vlen - start > GF_CHUNK ? start + GF_CHUNK : vlen;
        for (size_t r0 = 0; r0 < job->nout; r0 += GF_GROUP) {
            /* Constant row counts, so each call unrolls with its accumulators in registers. */
            switch (job->nout - r0 >= GF_GROUP ? GF_GROUP : job->nout - r0) {
            case 1: avx2_rows(job, r0, 1, start, end); break;
            case 2: avx2_rows(job, r0, 2, start, end); break;
            case 3: avx2_rows(job, r0, 3, start, end); break;
            default: avx2_rows(job, r0, 4, start, end); break;
            }
        }
    }
    if (vlen < job->len)
        combine_scalar_range(job, vlen, job->len);
}

/* ---- AVX-512BW + GFNI affine -------------------------------------------------------------- */

/* The bit matrix A of y = c*x for vgf2p8affineqb: bit i of y is the parity of
 * (byte 7-i of A) & x, so byte 7-i holds, at bit j, bit i of c * 2^j. */
static uint64_t gf_affine_matrix(uint8_t c)
{
    uint64_t m = 0;
    for (int i = 0; i < 8; i++) {
        unsigned row = 0;
        for (int j = 0; j < 8; j++)
            row |= (unsigned)((gf_mul_table[c][1u << j] >> i) & 1u) << j;
        m |= (uint64_t)row << (8 * (7 - i));
    }
    return m;
}

static void gfni_matrices(const gf_job *job)
{
    for (size_t i = 0; i < job->nout * job->nin; i++) {
        uint64_t m = gf_affine_matrix(job->coefs[i]);
        memcpy(job->scratch + i * 8, &m, 8);
    }
}

__attribute__((target("avx512f,avx512bw,gfni"), always_inline)) static inline void
gfni_rows(const gf_job *job, size_t r0, size_t rows, size_t start, size_t end)
{
    for (size_t x = start; x < end; x += 64) {
        __m512i acc[GF_GROUP];
        for (size_t r = 0; r < rows; r++)
            acc[r] = _mm512_setzero_si512();
        for (size_t j = 0; j < job->nin; j++) {
            __m512i v = _mm512_loadu_si512((const void *)(job->in[j] + x));
            for (size_t r = 0; r < rows; r++) {
                uint64_t m;
                memcpy(&m, job->scratch + ((r0 + r) * job->nin + j) * 8, 8);
                acc[r] = _mm512_xor_si512(
                    acc[r], _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64((long long)m), 0));
            }
        }
        for (size_t r = 0; r < rows; r++)
            _mm512_storeu_si512((void *)(job->out[r0 + r] + x), acc[r]);
    }
}

__attribute__((target("avx512f,avx512bw,gfni"))) static void combine_gfni(const gf_job *job)
{
    size_t vlen = job->len & ~(size_t)63;
    gfni_matrices(job);
    for (size_t start = 0; start < vlen; start += GF_CHUNK) {
        size_t end = vlen - start > GF_CHUNK ? start + GF_CHUNK : vlen;
        for (size_t r0 = 0; r0 < job->nout; r0 += GF_GROUP) {
            switch (job->nout - r0 >= GF_GROUP ? GF_GROUP : job->nout - r0) {
            case 1: gfni_rows(job, r0, 1, start, end); break;
            case 2: gfni_rows(job, r0, 2, start, end); break;
            case 3: gfni_rows(job, r0, 3, start, end); break;
            default: gfni_rows(job, r0, 4, start, end); break;
            }
        }
    }
    if (vlen < job->len)
        combine_scalar_range(job, vlen, job->len);
}

#endif /* GF_X86 */

/* ---- dispatch ----------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    void (*run)(const gf_job *job);
    int usable;
} gf_impl;

/* Fastest first. */
static gf_impl gf_impls[] = {
#ifdef GF_X86
    {"gfni", combine_gfni, 0},
    {"avx2", combine_avx2, 0},
#endif
    {"scalar", combine_scalar, 1},
};
#define GF_NIMPLS (sizeof(gf_impls) / sizeof(gf_impls[0]))

static void gf_detect(void)
{
#ifdef GF_X86
    __builtin_cpu_init();
    /* libgcc's avx2/avx512 bits also check that the OS saves the wider registers (XCR0). */
    gf_impls[0].usable = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                         && __builtin_cpu_supports("gfni");
    gf_impls[1].usable = __builtin_cpu_supports("avx2");
#endif
}

static const gf_impl *gf_find_impl(const char *name)
{
    for (size_t i = 0; i < GF_NIMPLS; i++) {
        if (!gf_impls[i].usable)
            continue;
        if (name == NULL || strcmp(name, gf_impls[i].name) == 0)
            return &gf_impls[i];
    }
    for (size_t i = 0; name != NULL && i < GF_NIMPLS; i++) {
        if (strcmp(name, gf_impls[i].name) == 0) {
            PyErr_Format(PyExc_ValueError, "implementation '%.100s' is not usable on this CPU", name);
            return NULL;
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown implementation '%.100s'", name ? name : "");
    return NULL;
}

/* ---- Python API --------------------------------------------------------------------------- */

static int overlaps(const Py_buffer *a, const Py_buffer *b)
{
    const char *pa = a->buf, *pb = b->buf;
    return a->len > 0 && b->len > 0 && pa < pb + b->len && pb < pa + a->len;
}

/* Acquire items[i] of a fast sequence as views[i]; on failure release what was acquired. */
static int get_buffers(PyObject *seq, const char *what, int flags, Py_buffer *views)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyObject_CheckBuffer(item)) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] is not a bytes-like object (got %.100s)", what, i,
                         Py_TYPE(item)->tp_name);
        } else if (PyObject_GetBuffer(item, &views[i], flags) == 0) {
            continue;
        } else if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Format(PyExc_BufferError, "%s[%zd] is not a %scontiguous buffer", what, i,
                         (flags & PyBUF_WRITABLE) ? "writable " : "");
        }
        while (i-- > 0)
            PyBuffer_Release(&views[i]);
        return -1;
    }
    return 0;
}

static PyObject *fast_sequence(PyObject *obj, const char *what)
{
    if (PyBytes_Check(obj) || PyByteArray_Check(obj) || PyMemoryView_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a sequence of buffers, not one buffer", what);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(obj, "");
    if (seq == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be a sequence of buffers (got %.100s)", what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > GF_MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "%s must hold 1 to %d buffers, got %zd", what, GF_MAX_ROWS, n);
        Py_DECREF(seq);
        return NULL;
    }
    return seq;
}

/* Checks that need every buffer: equal lengths, and no output sharing memory with another
 * buffer (outputs are written chunk by chunk while inputs are still being read). */
static int check_views(const Py_buffer *ins, size_t nin, const Py_buffer *outs, size_t nout)
{
    Py_ssize_t len = ins[0].len;
    for (size_t j = 0; j < nin; j++) {
        if (ins[j].len != len) {
            PyErr_Format(PyExc_ValueError,
                         "all buffers must have one length: inputs[0] is %zd bytes, inputs[%zu] is %zd",
                         len, j, ins[j].len);
            return -1;
        }
    }
    for (size_t r = 0; r < nout; r++) {
        if (outs[r].len != len) {
            PyErr_Format(PyExc_ValueError,
                         "all buffers must have one length: inputs[0] is %zd bytes, outputs[%zu] is %zd",
                         len, r, outs[r].len);
            return -1;
        }
        for (size_t j = 0; j < nin; j++) {
            if (overlaps(&outs[r], &ins[j])) {
                PyErr_Format(PyExc_ValueError, "outputs[%zu] overlaps inputs[%zu]", r, j);
                return -1;
            }
        }
        for (size_t q = 0; q < r; q++) {
            if (overlaps(&outs[r], &outs[q])) {
                PyErr_Format(PyExc_ValueError, "outputs[%zu] overlaps outputs[%zu]", r, q);
                return -1;
            }
        }
    }
    return 0;
}

static PyObject *gf_combine(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"coefs", "inputs", "outputs", "impl", NULL};
    Py_buffer coefs;
    PyObject *inputs_obj, *outputs_obj;
    const char *impl_name = NULL;
    PyObject *ins_seq = NULL, *outs_seq = NULL, *result = NULL;
    Py_buffer *views = NULL;
    const uint8_t **in_ptrs = NULL;
    uint8_t **out_ptrs = NULL;
    uint8_t *scratch = NULL;
    size_t nin = 0, nout = 0;
    int have_ins = 0, have_outs = 0;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*OO|$z:combine", kwlist, &coefs, &inputs_obj,
                                     &outputs_obj, &impl_name))
        return NULL;
    const gf_impl *impl = gf_find_impl(impl_name);
    if (impl == NULL)
        goto done;
    if ((ins_seq = fast_sequence(inputs_obj, "inputs")) == NULL)
        goto done;
    if ((outs_seq = fast_sequence(outputs_obj, "outputs")) == NULL)
        goto done;
    nin = (size_t)PySequence_Fast_GET_SIZE(ins_seq);
    nout = (size_t)PySequence_Fast_GET_SIZE(outs_seq);
    if ((size_t)coefs.len != nin * nout) {
        PyErr_Format(PyExc_ValueError,
                     "coefs must hold len(outputs) * len(inputs) = %zu bytes, got %zd", nin * nout,
                     coefs.len);
        goto done;
    }
    views = PyMem_Calloc(nin + nout, sizeof(Py_buffer));
    in_ptrs = PyMem_Calloc(nin, sizeof(*in_ptrs));
    out_ptrs = PyMem_Calloc(nout, sizeof(*out_ptrs));
    scratch = PyMem_Malloc(nin * nout * 32);
    if (views == NULL || in_ptrs == NULL || out_ptrs == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_buffers(ins_seq, "inputs", PyBUF_SIMPLE, views) < 0)
        goto done;
    have_ins = 1;
    if (get_buffers(outs_seq, "outputs", PyBUF_WRITABLE, views + nin) < 0)
        goto done;
    have_outs = 1;
    if (check_views(views, nin, views + nin, nout) < 0)
        goto done;

    for (size_t j = 0; j < nin; j++)
        in_ptrs[j] = views[j].buf;
    for (size_t r = 0; r < nout; r++)
        out_ptrs[r] = views[nin + r].buf;
    gf_job job = {coefs.buf, in_ptrs, out_ptrs, nin, nout, (size_t)views[0].len, scratch};
    if (job.len > 0) {
        Py_BEGIN_ALLOW_THREADS
        impl->run(&job);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);

done:
    if (have_outs)
        for (size_t r = 0; r < nout; r++)
            PyBuffer_Release(&views[nin + r]);
    if (have_ins)
        for (size_t j = 0; j < nin; j++)
            PyBuffer_Release(&views[j]);
    PyMem_Free(scratch);
    PyMem_Free(out_ptrs);
    PyMem_Free(in_ptrs);
    PyMem_Free(views);
    Py_XDECREF(outs_seq);
    Py_XDECREF(ins_seq);
    PyBuffer_Release(&coefs);
    return result;
}

static PyObject *gf_implementations(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyObject *names = PyList_New(0);
    if (names == NULL)
        return NULL;
    for (size_t i = 0; i < GF_NIMPLS; i++) {
        if (!gf_impls[i].usable)
            continue;
        PyObject *name = PyUnicode_FromString(gf_impls[i].name);
        if (name == NULL || PyList_Append(names, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(name);
    }
    PyObject *result = PyList_AsTuple(names);
    Py_DECREF(names);
    return result;
}

PyDoc_STRVAR(combine_doc,
"combine(coefs, inputs, outputs, *, impl=None)\n--\n\n"
"outputs[r] = XOR over j of coefs[r * len(inputs) + j] * inputs[j], byte by byte in GF(2^8)\n"
"(polynomial 0x11D, as zfec). 1 to 256 inputs and outputs, all of one length; outputs\n"
"writable and sharing no memory with any other buffer. impl names an implementation from\n"
"implementations(); the default is the fastest. Releases the GIL while computing.");

PyDoc_STRVAR(implementations_doc,
"implementations()\n--\n\n"
"Names of the implementations usable on this CPU, fastest first.");

static PyMethodDef gf_methods[] = {
    {"combine", (PyCFunction)(void (*)(void))gf_combine, METH_VARARGS | METH_KEYWORDS, combine_doc},
    {"implementations", gf_implementations, METH_NOARGS, implementations_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef gf_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "threebot.storage._gf",
    .m_doc = "GF(2^8) multiply-accumulate over byte buffers (zfec's field), SIMD where available.",
    .m_size = 0,
    .m_methods = gf_methods,
};

PyMODINIT_FUNC PyInit__gf(void)
{
    gf_init_tables();
    gf_detect();
    return PyModuleDef_Init(&gf_module);
}
