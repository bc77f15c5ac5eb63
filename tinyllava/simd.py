"""The CPU instructions that numba does not choose by itself, as numba intrinsics: each function below writes a
few lines of LLVM IR into the loop that calls it, and LLVM turns them into one or a few instructions.

    f16(b, o)                 the float16 at bytes b[o], b[o+1] -> float32 (vcvtph2ps on x86 since 2012)
    prefetch(b, o)            start loading the cache line of b[o]
    dot_q8_0(w, o, x, xo)     32 int8 weights at w[o:] . 32 int8 activations at x[xo:]  -> int32
    dot_q4(w, o, x, xo)       32 4-bit weights (16 bytes, Q4_0/Q4_1's packing) . x      -> int32
    dot_q5_0(w, o, h, x, xo)  32 5-bit weights (Q5_0: 16 bytes, the fifth bits at w[h:h+4]) . x -> int32
    dot_q4_k(w, o, x, xo)     32 bytes of Q4_K: low nibbles . x[xo:xo+32], high . x[xo+32:xo+64] -> 2 x int32
    dot_q6_k(w, ql, qh, k, x, xo)   run k (0..3) of a Q6_K half: 32 weights - 32 . x   -> 2 x int32 (16 each)

The dot products are exact integer sums: llama.cpp's way of decoding (fused.py says why). x86 multiplies
unsigned bytes by signed bytes: `vpmaddubsw` makes 16-bit sums of two products and `vpmaddwd` adds pairs of
those into 32 bits (AVX2), or `vpdpbusd` does both in one (AVX-512 VNNI and AVX-VNNI). Signed weights (Q8_0,
Q6_K's q - 32) go in as |w| with w's sign moved onto x (`vpsignb`), as llama.cpp does. No sum can overflow:
a 16-bit pair is at most 2 * 128 * 127 = 32512.

INSTRUCTIONS is what the loops are compiled with, decided once from the CPU features numba compiles for (this CPU,
or NUMBA_CPU_NAME / NUMBA_CPU_FEATURES): "avx512vnni", "avxvnni", "avx2", or None. numba's cache keys compiled code
by the same features, so a cached loop never runs on a CPU it was not made for. With None (an x86 without AVX2,
an ARM CPU) the same functions are written as plain vector IR (widen, multiply, add) that LLVM compiles for any
CPU; fused.py then keeps the float kernels, which are faster there.
"""
import platform

try:
    import numba
except ImportError:
    numba = None


def compile_features():  # -> the CPU features numba compiles for: {"+avx2", "-avx512f", ...}
    import llvmlite.binding as llvm
    return set((numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()).split(","))


def on_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def choose_instructions(features, x86=True):
    """-> the integer dot-product instructions to compile for, from a set of LLVM features ("+avx2", ...).
    AVX-512 VNNI is used on 256-bit registers, which needs AVX-512 VL; AVX-VNNI is its VEX form (Intel since
    Alder Lake, AMD since Zen 5); both do a 32-byte product in one instruction."""
    if not x86 or "+avx2" not in features:
        return None
    if "+avx512vnni" in features and "+avx512vl" in features:
        return "avx512vnni"
    if "+avxvnni" in features:
        return "avxvnni"
    return "avx2"


if numba:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    FEATURES = compile_features()
    NATIVE_F16 = not on_x86() or "+f16c" in FEATURES   # can the CPU widen float16 itself? (x86 without F16C cannot)
    INSTRUCTIONS = choose_instructions(FEATURES, on_x86())
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)

    def vec(t, n):
        return ir.VectorType(t, n)

    def splat(t, n, value):
        return ir.Constant(vec(t, n), [value] * n)

    def splat_value(builder, v, n=32):  # a value -> <n x its type> of it
        one = builder.insert_element(ir.Constant(vec(v.type, n), ir.Undefined), v, i32(0))
        return builder.shuffle_vector(one, one, ir.Constant(vec(i32, n), [0] * n))

    def call(builder, name, ret, *args):  # an LLVM intrinsic (or library) function by name
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
        return builder.call(fn, args)

    def address(context, builder, arrty, arr, o, t):  # a pointer to arr's bytes from o on, as type t
        data = context.make_array(arrty)(context, builder, arr).data
        return builder.bitcast(builder.gep(data, [o]), t.as_pointer())

    def load(context, builder, arrty, arr, o, t):  # the bytes at arr[o:] as a value of type t, unaligned
        return builder.load(address(context, builder, arrty, arr, o, t), align=1)

    def widen_f16(builder, h):  # float16 bits (i16) -> float32 with integer operations: x86 before F16C
        """The sign moves to bit 31; exponent and mantissa move up 13 bits, which reads as the value times 2^-112
        (the exponent biases are 15 and 127), so one multiply by 2^112 makes it exact, subnormals included.
        Infinities and NaNs (exponent all ones) get float32's all-ones exponent instead."""
        f32 = ir.FloatType()
        bits = builder.zext(h, i32)
        sign = builder.shl(builder.and_(bits, i32(0x8000)), i32(16))
        body = builder.shl(builder.and_(bits, i32(0x7FFF)), i32(13))
        finite = builder.fmul(builder.bitcast(body, f32), f32(2.0 ** 112))
        special = builder.bitcast(builder.or_(body, i32(0x7F800000)), f32)
        is_special = builder.icmp_unsigned(">=", body, i32(0x7C00 << 13))
        value = builder.bitcast(builder.select(is_special, special, finite), i32)
        return builder.bitcast(builder.or_(value, sign), f32)

    @intrinsic
    def f16(typingctx, b, o):  # the little-endian float16 at bytes b[o], b[o + 1] -> float32
        """Load the two bytes as a float16 and widen it: one instruction (vcvtph2ps) on x86 since 2012. numba has
        no float16 type, and the same conversion done with shifts and masks is slower; an x86 CPU without
        F16C (before 2012, and Atom-class cores without AVX) gets it all the same: LLVM would call a library
        function the JIT does not have."""
        def codegen(context, builder, sig, args):
            h = load(context, builder, sig.args[0], args[0], args[1], ir.IntType(16))
            if not NATIVE_F16:
                return widen_f16(builder, h)
            return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())
        return numba.float32(b, numba.intp), codegen

    @intrinsic
    def prefetch(typingctx, b, o):  # ask the CPU to start loading the cache line of b[o]; no result
        def codegen(context, builder, sig, args):
            at = address(context, builder, sig.args[0], args[0], args[1], i8)
            call(builder, "llvm.prefetch.p0", ir.VoidType(), at, i32(0), i32(3), i32(1))  # read, keep in all caches, data
            return context.get_dummy_value()
        return numba.void(b, numba.intp), codegen

    # -- integer products of 32 bytes: the four lanes of bytes 4k..4k+3 summed into int32 k (k = 0..7) ---------
    def udot(builder, u, s):  # u <32 x i8> unsigned, s <32 x i8> signed -> <8 x i32>
        if INSTRUCTIONS in ("avx512vnni", "avxvnni"):     # one instruction: 4 products and their sum, 8 times
            zero = ir.Constant(vec(i32, 8), None)
            as_i32 = [builder.bitcast(v, vec(i32, 8)) for v in (u, s)]
            return call(builder, "llvm.x86.avx512.vpdpbusd.256", vec(i32, 8), zero, *as_i32)
        if INSTRUCTIONS == "avx2":                         # pairs of products into 16 bits, pairs of those into 32
            pairs = call(builder, "llvm.x86.avx2.pmadd.ub.sw", vec(i16, 16), u, s)
            return call(builder, "llvm.x86.avx2.pmadd.wd", vec(i32, 8), pairs, splat(i16, 16, 1))
        return quads(builder, builder.mul(builder.zext(u, vec(i32, 32)), builder.sext(s, vec(i32, 32))))

    def sdot(builder, w, s):  # w, s <32 x i8> both signed -> <8 x i32>: |w| . (s with w's sign), as llama.cpp
        if INSTRUCTIONS is None:
            return quads(builder, builder.mul(builder.sext(w, vec(i32, 32)), builder.sext(s, vec(i32, 32))))
        magnitude = call(builder, "llvm.abs.v32i8", vec(i8, 32), w, ir.Constant(ir.IntType(1), 0))  # -128 -> 128
        signed = call(builder, "llvm.x86.avx2.psign.b", vec(i8, 32), s, w)
        return udot(builder, magnitude, signed)

    def quads(builder, products):  # <32 x i32> -> <8 x i32>: lane k the sum of products 4k..4k+3 (plain IR)
        take = [builder.shuffle_vector(products, products, ir.Constant(vec(i32, 8), list(range(j, 32, 4))))
                for j in range(4)]
        return builder.add(builder.add(take[0], take[1]), builder.add(take[2], take[3]))

    def total(builder, lanes, first=0, n=8):  # the sum of int32 lanes first..first+n-1
        if n < 8:
            lanes = builder.shuffle_vector(lanes, lanes, ir.Constant(vec(i32, n), list(range(first, first + n))))
        return call(builder, f"llvm.vector.reduce.add.v{n}i32", i32, lanes)

    def nibbles(builder, b16):  # <16 x i8> -> <32 x i8>: the low nibbles (weights 0..15), then the high (16..31)
        lo = builder.and_(b16, splat(i8, 16, 15))
        hi = builder.lshr(b16, splat(i8, 16, 4))
        return builder.shuffle_vector(lo, hi, ir.Constant(vec(i32, 32), list(range(32))))

    INT32, PAIR, FOUR = numba.int32, numba.types.UniTuple(numba.int32, 2), numba.types.UniTuple(numba.int32, 4)

    def pair(context, builder, a, b):  # two int32 -> a numba UniTuple(int32, 2)
        return context.make_tuple(builder, PAIR, [a, b])

    def totals4(context, builder, rows):  # four <8 x i32> -> UniTuple(int32, 4) of their totals
        """Adding neighbours three times sums four vectors at once: 9 shuffles and adds instead of 4 x 6."""
        def neighbours(a, b):  # [a0 + a1, a2 + a3, a4 + a5, a6 + a7, b0 + b1, ..., b6 + b7]
            even = builder.shuffle_vector(a, b, ir.Constant(vec(i32, 8), list(range(0, 16, 2))))
            odd = builder.shuffle_vector(a, b, ir.Constant(vec(i32, 8), list(range(1, 16, 2))))
            return builder.add(even, odd)
        q = neighbours(neighbours(rows[0], rows[1]), neighbours(rows[2], rows[3]))  # each row in two lanes
        t = neighbours(q, q)                                                          # rows 0..3 in lanes 0..3
        return context.make_tuple(builder, FOUR, [builder.extract_element(t, i32(i)) for i in range(4)])

    def four(context, builder, sig, args, row_dot):
        """Four rows of a matrix, rb bytes apart in flat (args: flat, o, rb, then the rest): row_dot(o_i) is row
        i's <8 x i32> lanes, with o_i = o + i rb. -> UniTuple(int32, 4)"""
        o, rb = args[1], args[2]
        offsets = [builder.add(o, builder.mul(rb, ir.Constant(rb.type, i))) for i in range(4)]
        return totals4(context, builder, [row_dot(oi) for oi in offsets])

    @intrinsic
    def dot4_q8_0(typingctx, flat, o, rb, x, xo):  # 4 rows: the 32 int8 weights at flat[o + i rb:] . x[xo:xo+32]
        def codegen(context, builder, sig, args):
            s = load(context, builder, sig.args[3], args[3], args[4], vec(i8, 32))
            return four(context, builder, sig, args, lambda oi: sdot(
                builder, load(context, builder, sig.args[0], args[0], oi, vec(i8, 32)), s))
        return FOUR(flat, numba.intp, numba.intp, x, numba.intp), codegen

    @intrinsic
    def dot4_q4(typingctx, flat, o, rb, x, xo):  # 4 rows of 16 bytes at flat[o + i rb:]: weight j the low nibble
        def codegen(context, builder, sig, args):                                 # of byte j, j + 16 the high
            s = load(context, builder, sig.args[3], args[3], args[4], vec(i8, 32))
            return four(context, builder, sig, args, lambda oi: udot(
                builder, nibbles(builder, load(context, builder, sig.args[0], args[0], oi, vec(i8, 16))), s))
        return FOUR(flat, numba.intp, numba.intp, x, numba.intp), codegen

    def q5_0(context, builder, arrty, arr, o, h):  # Q4_0's nibbles at arr[o:], + 16 where bit j of uint32 arr[h:]
        q = nibbles(builder, load(context, builder, arrty, arr, o, vec(i8, 16)))
        bits = load(context, builder, arrty, arr, h, vec(i8, 4))                         # the 32 fifth bits
        spread = builder.shuffle_vector(bits, bits, ir.Constant(vec(i32, 32), [j // 8 for j in range(32)]))
        mask = ir.Constant(vec(i8, 32), [1 << (j % 8) for j in range(32)])               # byte j: bit j % 8
        on = builder.icmp_unsigned("!=", builder.and_(spread, mask), ir.Constant(vec(i8, 32), None))
        return builder.or_(q, builder.select(on, splat(i8, 32, 16), ir.Constant(vec(i8, 32), None)))

    @intrinsic
    def dot4_q5_0(typingctx, flat, o, rb, h, x, xo):  # 4 rows of Q5_0: nibbles at flat[o + i rb:], bits at h + i rb
        def codegen(context, builder, sig, args):
            s = load(context, builder, sig.args[4], args[4], args[5], vec(i8, 32))
            delta = builder.sub(args[3], args[1])                                        # h - o
            return four(context, builder, sig, args, lambda oi: udot(
                builder, q5_0(context, builder, sig.args[0], args[0], oi, builder.add(oi, delta)), s))
        return FOUR(flat, numba.intp, numba.intp, numba.intp, x, numba.intp), codegen

    @intrinsic
    def dot_q4_k(typingctx, w, o, x, xo):  # 32 bytes at w[o:]: low nibbles . x[xo:xo+32], high . x[xo+32:xo+64]
        def codegen(context, builder, sig, args):
            b = load(context, builder, sig.args[0], args[0], args[1], vec(i8, 32))
            lo, hi = builder.and_(b, splat(i8, 32, 15)), builder.lshr(b, splat(i8, 32, 4))
            x0 = load(context, builder, sig.args[2], args[2], args[3], vec(i8, 32))
            x1 = load(context, builder, sig.args[2], args[2], builder.add(args[3], ir.Constant(args[3].type, 32)),
                      vec(i8, 32))
            return pair(context, builder, total(builder, udot(builder, lo, x0)), total(builder, udot(builder, hi, x1)))
        return PAIR(w, numba.intp, x, numba.intp), codegen

    @intrinsic
    def dot_q6_k(typingctx, w, ql, qh, k, x, xo):
        """Run k (0..3) of one 128-weight half of a Q6_K super-block, whose 64 low-bit bytes start at w[ql] and 32
        high-bit bytes at w[qh]: weight l (0..31) is the nibble k // 2 of byte ql + 32 (k % 2) + l, plus bits
        2k, 2k+1 of byte qh + l as its top two, minus 32. . x[xo:xo+32] -> (the sum of l < 16, of l >= 16)."""
        def codegen(context, builder, sig, args):
            wty, (w, ql, qh, k), c = sig.args[0], args[:4], lambda v: ir.Constant(args[3].type, v)
            low = load(context, builder, wty, w, builder.add(ql, builder.mul(builder.and_(k, c(1)), c(32))), vec(i8, 32))
            shift = builder.trunc(builder.mul(builder.lshr(k, c(1)), c(4)), i8)                 # 0 or 4
            low = builder.and_(builder.lshr(low, splat_value(builder, shift)), splat(i8, 32, 15))
            top = load(context, builder, wty, w, qh, vec(i8, 32))
            shift = builder.trunc(builder.mul(k, c(2)), i8)                                      # 2k
            top = builder.and_(builder.lshr(top, splat_value(builder, shift)), splat(i8, 32, 3))
            q = builder.sub(builder.or_(low, builder.shl(top, splat(i8, 32, 4))), splat(i8, 32, 32))   # -32..31
            s = load(context, builder, sig.args[4], args[4], args[5], vec(i8, 32))
            lanes = sdot(builder, q, s)
            return pair(context, builder, total(builder, lanes, 0, 4), total(builder, lanes, 4, 4))
        return PAIR(w, numba.intp, numba.intp, numba.intp, x, numba.intp), codegen
