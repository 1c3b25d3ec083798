// Python module procrustes_kernels._C: numpy buffers in, checked, handed to ops.cpp.
//
// The Python wrapper (procrustes_kernels/ops/cpp_ops.py) passes CPU tensors as zero-copy numpy
// views. Every argument is checked here again (dtype, 1-D, C-contiguous, length, writability) so
// that a wrong call raises TypeError / ValueError instead of reading or writing out of bounds.
// The GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common.h"
#include "ops.h"
#include "spmm.h"

namespace py = pybind11;

namespace {

std::string where(const char* fn) { return std::string(fn) + "(): "; }

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    s += (a.ndim() == 1 || i + 1 < a.ndim()) ? "," : "";
    if (i + 1 < a.ndim()) s += " ";
  }
  return s + ")";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  if constexpr (std::is_same_v<T, double>) return "float64";
  if constexpr (std::is_same_v<T, uint8_t>) return "uint8";
  if constexpr (std::is_same_v<T, uint16_t>) return "uint16";
  if constexpr (std::is_same_v<T, bool>) return "bool";
  if constexpr (std::is_same_v<T, int32_t>) return "int32";
  if constexpr (std::is_same_v<T, int64_t>) return "int64";
  return "?";
}

// A 1-D C-contiguous array of dtype T with `size` elements (size < 0: any).
template <class T>
py::array expect(const py::handle& obj, const char* fn, const char* name, int64_t size,
                 bool writable = false) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(where(fn) + "expected " + name + " to be a numpy array, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<T>>(a)) {
    throw py::type_error(where(fn) + "expected " + name + " of dtype " + dtype_name<T>() +
                         ", got " + std::string(py::str(a.dtype())));
  }
  if (a.ndim() != 1) {
    throw py::value_error(where(fn) + "expected " + name + " to be 1-D, got shape " +
                          shape_of(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(where(fn) + "expected " + name + " to be contiguous");
  }
  if (size >= 0 && a.size() != size) {
    throw py::value_error(where(fn) + "expected " + name + " of length " + std::to_string(size) +
                          ", got " + std::to_string(a.size()));
  }
  if (writable && !a.writeable()) {
    throw py::value_error(where(fn) + "expected " + name + " to be writable");
  }
  return a;
}

void expect_numel(int64_t numel, const char* fn) {
  if (numel < 0) throw py::value_error(where(fn) + "expected numel >= 0, got " + std::to_string(numel));
}

template <class T>
bool is_array_of(const py::handle& obj) {
  return py::isinstance<py::array_t<T>>(obj);
}

// The storage arrays every segment op reads, checked against numel.
struct Storage {
  py::array values, bits, group_ptr;
};

template <class T>
Storage expect_storage(const py::handle& values, const py::handle& bits,
                       const py::handle& group_ptr, int64_t numel, const char* fn) {
  expect_numel(numel, fn);
  Storage s{expect<T>(values, fn, "values", -1),
            expect<uint8_t>(bits, fn, "bits", ceil_div(numel, 8)),
            expect<int64_t>(group_ptr, fn, "group_ptr", ceil_div(numel, pk::kGroupSize) + 1)};
  return s;
}

// Arguments shared by the update ops, as keyword arguments from the wrapper.
struct SegmentIn {
  py::object values, bits, group_ptr, grad, momentum, tracked_c, tracked_m;
  uint64_t seed;
  double bound;
  int64_t numel;
  double scale_prev, lr, mu, wd, scale;
  bool fused;
};

template <class T>
pk::SegmentArgs<T> segment_args(const SegmentIn& in, const char* fn) {
  Storage st = expect_storage<T>(in.values, in.bits, in.group_ptr, in.numel, fn);
  py::array grad = expect<T>(in.grad, fn, "grad", in.numel);
  const T* mom = nullptr;
  if (!in.momentum.is_none()) {
    py::array m = expect<T>(in.momentum, fn, "momentum", -1);
    if (m.size() != 0 && m.size() != st.values.size()) {
      throw py::value_error(where(fn) + "expected momentum of length values.numel() = " +
                            std::to_string(st.values.size()) + " (or empty), got " +
                            std::to_string(m.size()));
    }
    if (m.size() != 0) mom = static_cast<const T*>(m.data());
  }
  pk::SegmentArgs<T> seg{in.seed,
                         in.bound,
                         in.numel,
                         static_cast<const T*>(st.values.data()),
                         static_cast<int64_t>(st.values.size()),
                         static_cast<const uint8_t*>(st.bits.data()),
                         static_cast<const int64_t*>(st.group_ptr.data()),
                         static_cast<const T*>(grad.data()),
                         mom};
  // Step space for the tracked elements' candidates and momenta (see ops.h).
  if (!in.tracked_c.is_none()) {
    seg.tracked_c = static_cast<T*>(
        expect<T>(in.tracked_c, fn, "tracked_c", st.values.size(), true).mutable_data());
  }
  if (!in.tracked_m.is_none()) {
    seg.tracked_m = static_cast<T*>(
        expect<T>(in.tracked_m, fn, "tracked_m", st.values.size(), true).mutable_data());
  }
  return seg;
}

pk::StepArgs step_args(const SegmentIn& in) {
  return {in.lr, in.mu, in.wd, in.scale, in.scale_prev, in.fused};
}

// f(T{}) with T the element type of `values` (float32 or float64): one instance per type.
template <class F>
auto with_value_type(const py::handle& values, const char* fn, F&& f) {
  if (is_array_of<float>(values)) return f(float{});
  if (is_array_of<double>(values)) return f(double{});
  if (!py::isinstance<py::array>(values)) {
    throw py::type_error(where(fn) + "expected values to be a numpy array, got " +
                         std::string(py::str(py::type::handle_of(values).attr("__name__"))));
  }
  throw py::type_error(where(fn) + "expected values of dtype float32 or float64, got " +
                       std::string(py::str(py::reinterpret_borrow<py::array>(values).dtype())));
}

pk::LogBins log_bins(int shift, int64_t base, int64_t nbins, const char* fn) {
  if (shift < 0 || shift > 31 || nbins < 1) {
    throw py::value_error(where(fn) + "expected 0 <= hist_shift <= 31 and hist_bins >= 1, got " +
                          std::to_string(shift) + ", " + std::to_string(nbins));
  }
  return {shift, base, nbins};
}

// The optional buffer of a step's stored score upper halves: numel uint16, writable unless only
// read.
uint16_t* upper_buffer(const py::object& scores, bool read_only, int64_t numel, const char* fn) {
  if (scores.is_none()) return nullptr;
  py::array a = expect<uint16_t>(scores, fn, "scores", numel, !read_only);
  return static_cast<uint16_t*>(const_cast<void*>(a.data()));
}

// A histogram pass's buffer: scores_valid (read it) needs one.
uint16_t* histogram_upper(const py::object& scores, bool valid, int64_t numel, const char* fn) {
  if (valid && scores.is_none()) {
    throw py::value_error(where(fn) + "scores_valid needs a scores buffer");
  }
  return upper_buffer(scores, valid, numel, fn);
}

template <class T>
py::array_t<T> new_array(int64_t n) {
  return py::array_t<T>(static_cast<py::ssize_t>(n));
}

// Segment ops take the same keyword arguments; this declares them once.
template <class... Extra>
auto seg_kwargs(Extra... extra) {
  return std::make_tuple(py::kw_only(), py::arg("values"), py::arg("bits"), py::arg("group_ptr"),
                         py::arg("grad"), py::arg("momentum").none(true), py::arg("seed"),
                         py::arg("bound"), py::arg("numel"), py::arg("scale_prev"),
                         py::arg("lr"), py::arg("mu"), py::arg("wd"), py::arg("scale"),
                         py::arg("fused"), py::arg("tracked_c").none(true) = py::none(),
                         py::arg("tracked_m").none(true) = py::none(), extra...);
}

template <class Ret, class... Args, class Tuple, size_t... I>
void def_seg(py::module_& m, const char* name, Ret (*f)(Args...), const char* doc,
             const Tuple& kw, std::index_sequence<I...>) {
  m.def(name, f, doc, std::get<I>(kw)...);
}

template <class Ret, class... Args, class Tuple>
void def_seg(py::module_& m, const char* name, Ret (*f)(Args...), const char* doc,
             const Tuple& kw) {
  def_seg(m, name, f, doc, kw, std::make_index_sequence<std::tuple_size_v<Tuple>>{});
}

#define PK_SEGMENT_PARAMS                                                                 \
  py::object values, py::object bits, py::object group_ptr, py::object grad,             \
      py::object momentum, uint64_t seed, double bound, int64_t numel, double scale_prev, \
      double lr, double mu, double wd, double scale, bool fused, py::object tracked_c,    \
      py::object tracked_m
#define PK_SEGMENT_IN                                                                      \
  SegmentIn {                                                                              \
    values, bits, group_ptr, grad, momentum, tracked_c, tracked_m, seed, bound, numel,      \
        scale_prev, lr, mu, wd, scale, fused                                               \
  }

py::array_t<int64_t> log_histogram(PK_SEGMENT_PARAMS, int hist_shift, int64_t hist_base,
                                   int64_t hist_bins, py::object scores, bool scores_valid) {
  const char* fn = "log_histogram";
  const SegmentIn in = PK_SEGMENT_IN;
  const pk::LogBins bins = log_bins(hist_shift, hist_base, hist_bins, fn);
  auto hist = new_array<int64_t>(hist_bins);
  int64_t* h = hist.mutable_data();
  with_value_type(in.values, fn, [&](auto tag) {
    using T = decltype(tag);
    const auto seg = segment_args<T>(in, fn);
    const auto p = step_args(in);
    uint16_t* sb = histogram_upper(scores, scores_valid, in.numel, fn);
    py::gil_scoped_release release;
    pk::log_histogram<T>(seg, p, bins, h, sb, scores_valid);
    return 0;
  });
  return hist;
}

py::array_t<int64_t> radix_histogram(PK_SEGMENT_PARAMS, int64_t high, py::object scores,
                                     bool scores_valid) {
  const char* fn = "radix_histogram";
  const SegmentIn in = PK_SEGMENT_IN;
  if (high >= pk::kRadixHighBins) {
    throw py::value_error(where(fn) + "expected high < 2**" + std::to_string(pk::kRadixHighBits) +
                          ", got " + std::to_string(high));
  }
  const int64_t nbins = high < 0 ? pk::kRadixHighBins : pk::kRadixLowBins;
  auto hist = new_array<int64_t>(nbins);
  int64_t* h = hist.mutable_data();
  with_value_type(in.values, fn, [&](auto tag) {
    using T = decltype(tag);
    const auto seg = segment_args<T>(in, fn);
    const auto p = step_args(in);
    uint16_t* sb = histogram_upper(scores, scores_valid, in.numel, fn);
    py::gil_scoped_release release;
    pk::radix_histogram<T>(seg, p, high, nbins, h, sb, scores_valid);
    return 0;
  });
  return hist;
}

void candidates(PK_SEGMENT_PARAMS, py::object c_out, py::object m_out, py::object s_out,
                py::object tracked_out) {
  const char* fn = "candidates";
  const SegmentIn in = PK_SEGMENT_IN;
  with_value_type(in.values, fn, [&](auto tag) {
    using T = decltype(tag);
    const auto seg = segment_args<T>(in, fn);
    const auto p = step_args(in);
    py::array s = expect<float>(s_out, fn, "s_out", in.numel, true);
    T* c = nullptr;
    T* m = nullptr;
    uint8_t* tr = nullptr;
    if (!c_out.is_none()) c = static_cast<T*>(expect<T>(c_out, fn, "c_out", in.numel, true).mutable_data());
    if (!m_out.is_none()) m = static_cast<T*>(expect<T>(m_out, fn, "m_out", in.numel, true).mutable_data());
    if (!tracked_out.is_none()) {
      tr = static_cast<uint8_t*>(
          expect<bool>(tracked_out, fn, "tracked_out", in.numel, true).mutable_data());
    }
    float* sp = static_cast<float*>(s.mutable_data());
    py::gil_scoped_release release;
    pk::candidates<T>(seg, p, c, m, sp, tr);
    return 0;
  });
}

// Second half of both compactions: allocate the kept values / momentum, then gather them.
template <class T>
py::tuple finish_compact(const SegmentIn& in, const pk::SegmentArgs<T>& seg,
                         const pk::StepArgs& p, const py::array_t<uint8_t>& bits,
                         const py::array_t<int64_t>& ptr, int64_t kept, bool zero_ok,
                         const pk::Compaction<T>* pre = nullptr) {
  auto values = new_array<T>(kept);
  py::object momentum = py::none();
  T* mom = nullptr;
  if (in.mu != 0) {
    auto mo = new_array<T>(kept);
    mom = mo.mutable_data();
    momentum = mo;
  }
  T* vals = values.mutable_data();
  {
    py::gil_scoped_release release;
    pk::compact_gather<T>(seg, p, bits.data(), ptr.data(), vals, mom, pre, zero_ok);
  }
  return py::make_tuple(values, bits, ptr, momentum);
}

py::tuple compact(PK_SEGMENT_PARAMS, double threshold, int64_t tie_quota, bool with_histogram,
                  int hist_shift, int64_t hist_base, int64_t hist_bins, py::object scores) {
  const char* fn = "compact";
  const SegmentIn in = PK_SEGMENT_IN;
  const pk::LogBins bins = log_bins(hist_shift, hist_base, hist_bins, fn);
  return with_value_type(in.values, fn, [&](auto tag) {
    using T = decltype(tag);
    const auto seg = segment_args<T>(in, fn);
    const auto p = step_args(in);
    const uint16_t* sb = upper_buffer(scores, true, in.numel, fn);
    auto new_bits = new_array<uint8_t>(ceil_div(in.numel, 8));
    auto ptr = new_array<int64_t>(ceil_div(in.numel, pk::kGroupSize) + 1);
    py::object hist = py::none();
    int64_t* h = nullptr;
    if (with_histogram) {
      auto ha = new_array<int64_t>(hist_bins);
      h = ha.mutable_data();
      hist = ha;
    }
    uint8_t* b = new_bits.mutable_data();
    int64_t* gp = ptr.mutable_data();
    pk::SelectResult r{};
    pk::Compaction<T> pre;
    {
      py::gil_scoped_release release;
      r = pk::compact_select<T>(seg, p, static_cast<float>(threshold), tie_quota, b, gp, bins, h,
                                sb, &pre);
    }
    const bool zero_ok = pk::keeps_positive_scores(static_cast<float>(threshold), tie_quota);
    py::tuple out = finish_compact<T>(in, seg, p, new_bits, ptr, r.kept, zero_ok, &pre);
    return py::make_tuple(out[0], out[1], out[2], out[3], r.ties_used, hist);
  });
}

py::tuple compact_mask(PK_SEGMENT_PARAMS, py::object keep) {
  const char* fn = "compact_mask";
  const SegmentIn in = PK_SEGMENT_IN;
  return with_value_type(in.values, fn, [&](auto tag) {
    using T = decltype(tag);
    const auto seg = segment_args<T>(in, fn);
    const auto p = step_args(in);
    py::array k = expect<bool>(keep, fn, "keep", in.numel);
    auto new_bits = new_array<uint8_t>(ceil_div(in.numel, 8));
    auto ptr = new_array<int64_t>(ceil_div(in.numel, pk::kGroupSize) + 1);
    const uint8_t* kp = static_cast<const uint8_t*>(k.data());
    uint8_t* b = new_bits.mutable_data();
    int64_t* gp = ptr.mutable_data();
    int64_t kept = 0;
    {
      py::gil_scoped_release release;
      kept = pk::mask_select(kp, in.numel, b, gp);
    }
    return finish_compact<T>(in, seg, p, new_bits, ptr, kept, false);  // any element may be kept
  });
}

void materialize(uint64_t seed, double bound, double scale, py::object values, py::object bits,
                 py::object group_ptr, int64_t numel, py::object out, int64_t start,
                 int64_t count) {
  const char* fn = "materialize";
  if (count < 0) count = numel - start;
  with_value_type(values, fn, [&](auto tag) {
    using T = decltype(tag);
    Storage st = expect_storage<T>(values, bits, group_ptr, numel, fn);
    py::array o = expect<T>(out, fn, "out", count, true);
    const T* v = static_cast<const T*>(st.values.data());
    const int64_t nv = st.values.size();
    const uint8_t* b = static_cast<const uint8_t*>(st.bits.data());
    const int64_t* gp = static_cast<const int64_t*>(st.group_ptr.data());
    T* op = static_cast<T*>(o.mutable_data());
    py::gil_scoped_release release;
    pk::materialize<T>(seed, bound, scale, v, nv, b, gp, numel, start, count, op);
    return 0;
  });
}

py::array_t<float> philox_uniform(uint64_t seed, py::object offsets) {
  const char* fn = "philox_uniform";
  const bool is32 = is_array_of<int32_t>(offsets);
  py::array off = is32 ? expect<int32_t>(offsets, fn, "offsets", -1)
                       : expect<int64_t>(offsets, fn, "offsets", -1);
  const int64_t n = off.size();
  auto out = new_array<float>(n);
  float* o = out.mutable_data();
  const int32_t* o32 = is32 ? static_cast<const int32_t*>(off.data()) : nullptr;
  const int64_t* o64 = is32 ? nullptr : static_cast<const int64_t*>(off.data());
  {
    py::gil_scoped_release release;
    pk::philox_uniform(seed, o32, o64, n, o);
  }
  return out;
}

double paper_walk(py::object scores, double theta, double up, double down, py::object mask_out) {
  const char* fn = "paper_walk";
  const bool is32 = is_array_of<float>(scores);
  py::array s = is32 ? expect<float>(scores, fn, "scores", -1) : expect<double>(scores, fn, "scores", -1);
  py::array m = expect<bool>(mask_out, fn, "mask_out", s.size(), true);
  uint8_t* mp = static_cast<uint8_t*>(m.mutable_data());
  const int64_t n = s.size();
  py::gil_scoped_release release;
  if (is32) return pk::paper_walk(static_cast<const float*>(s.data()), n, theta, up, down, mp);
  return pk::paper_walk(static_cast<const double*>(s.data()), n, theta, up, down, mp);
}


// ------------------------------------------------------------------- sparse compute (spmm.h)
struct SpmmIn {
  pk::SparseGeometry g;
  int64_t max_shift;
  py::array values, bits, phase, shift;  // kept alive while g points into them
};

SpmmIn spmm_in(const py::handle& values, const py::handle& bits, int64_t rows, int64_t cols,
               int64_t ksize, int64_t groups, int64_t phases, const py::handle& phase,
               const py::handle& shift, int64_t L, const char* fn) {
  if (rows <= 0 || cols <= 0 || ksize <= 0 || groups <= 0 || rows % groups || phases <= 0 ||
      L < 0) {
    throw py::value_error(where(fn) + "expected positive rows, cols, ksize, groups, phases "
                          "(rows divisible by groups) and L >= 0, got " + std::to_string(rows) +
                          ", " + std::to_string(cols) + ", " + std::to_string(ksize) + ", " +
                          std::to_string(groups) + ", " + std::to_string(phases) + ", " +
                          std::to_string(L));
  }
  SpmmIn in;
  in.values = expect<float>(values, fn, "values", -1);
  in.bits = expect<uint8_t>(bits, fn, "bits", ceil_div(rows * cols * ksize, 8));
  in.phase = expect<int32_t>(phase, fn, "phase", ksize);
  in.shift = expect<int64_t>(shift, fn, "shift", ksize);
  const auto* ph = static_cast<const int32_t*>(in.phase.data());
  const auto* sh = static_cast<const int64_t*>(in.shift.data());
  in.max_shift = 0;
  for (int64_t k = 0; k < ksize; ++k) {
    if (ph[k] < 0 || ph[k] >= phases || sh[k] < 0) {
      throw py::value_error(where(fn) + "expected phase in [0, phases) and shift >= 0, got " +
                            std::to_string(ph[k]) + " and " + std::to_string(sh[k]) +
                            " at position " + std::to_string(k));
    }
    in.max_shift = std::max(in.max_shift, sh[k]);
  }
  in.g = pk::SparseGeometry{static_cast<const float*>(in.values.data()),
                            static_cast<int64_t>(in.values.size()),
                            static_cast<const uint8_t*>(in.bits.data()),
                            rows, cols, ksize, groups, phases, ph, sh, L};
  return in;
}

template <class T>
T* spmm_buffer(const py::handle& obj, const char* fn, const char* name, int64_t size,
               bool at_least, bool writable) {
  py::array a = expect<T>(obj, fn, name, at_least ? -1 : size, writable);
  if (at_least && a.size() < size) {
    throw py::value_error(where(fn) + "expected " + name + " of length >= " +
                          std::to_string(size) + ", got " + std::to_string(a.size()));
  }
  return static_cast<T*>(const_cast<void*>(a.data()));
}

int64_t spmm_head(int64_t head, int64_t max_shift, const char* fn) {
  if (head < max_shift) {
    throw py::value_error(where(fn) + "expected head >= max(shift) = " +
                          std::to_string(max_shift) + ", got " + std::to_string(head));
  }
  return head;
}

#define SPMM_GEOMETRY_ARGS                                                                   \
  const py::handle &values, const py::handle &bits, int64_t rows, int64_t cols, int64_t ksize, \
      int64_t groups, int64_t phases, const py::handle &phase, const py::handle &shift, int64_t L
#define SPMM_GEOMETRY values, bits, rows, cols, ksize, groups, phases, phase, shift, L

void spmm_forward(SPMM_GEOMETRY_ARGS, const py::handle& x, const py::object& bias,
                  const py::handle& out) {
  const char* fn = "spmm_forward";
  SpmmIn in = spmm_in(SPMM_GEOMETRY, fn);
  const int64_t planes = groups * cols * phases * L;
  const float* xp = spmm_buffer<float>(x, fn, "x", planes + in.max_shift, true, false);
  const float* b = bias.is_none() ? nullptr : spmm_buffer<float>(bias, fn, "bias", rows, false, false);
  float* y = spmm_buffer<float>(out, fn, "out", rows * L, false, true);
  try {
    py::gil_scoped_release release;
    pk::sparse_forward(in.g, xp, b, y);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(where(fn) + e.what());
  }
}

// A linear layer's geometry: ksize 1, one phase, no shift.
SpmmIn linear_in(const py::handle& values, const py::handle& bits, int64_t rows, int64_t cols,
                 int64_t groups, int64_t L, const char* fn) {
  py::array_t<int32_t> phase(1);
  py::array_t<int64_t> shift(1);
  phase.mutable_at(0) = 0;
  shift.mutable_at(0) = 0;
  return spmm_in(values, bits, rows, cols, 1, groups, 1, phase, shift, L, fn);
}

void spmm_linear_forward(const py::handle& values, const py::handle& bits, int64_t rows,
                         int64_t cols, int64_t groups, int64_t L, const py::handle& x,
                         const py::object& bias, const py::handle& out) {
  const char* fn = "spmm_linear_forward";
  SpmmIn in = linear_in(values, bits, rows, cols, groups, L, fn);
  const float* xp = spmm_buffer<float>(x, fn, "x", L * groups * cols, false, false);
  const float* b = bias.is_none() ? nullptr : spmm_buffer<float>(bias, fn, "bias", rows, false, false);
  float* y = spmm_buffer<float>(out, fn, "out", L * rows, false, true);
  try {
    py::gil_scoped_release release;
    pk::sparse_linear_forward(in.g, xp, b, y);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(where(fn) + e.what());
  }
}

void spmm_linear_backward(const py::handle& values, const py::handle& bits, int64_t rows,
                          int64_t cols, int64_t groups, int64_t L, const py::handle& dy,
                          const py::handle& out) {
  const char* fn = "spmm_linear_backward";
  SpmmIn in = linear_in(values, bits, rows, cols, groups, L, fn);
  const float* d = spmm_buffer<float>(dy, fn, "dy", L * rows, false, false);
  float* dx = spmm_buffer<float>(out, fn, "out", L * groups * cols, false, true);
  try {
    py::gil_scoped_release release;
    pk::sparse_linear_backward(in.g, d, dx);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(where(fn) + e.what());
  }
}

void spmm_linear_sddmm(const py::handle& values, const py::handle& bits, int64_t rows,
                       int64_t cols, int64_t groups, int64_t L, const py::handle& x,
                       const py::handle& dy, const py::handle& out) {
  const char* fn = "spmm_linear_sddmm";
  SpmmIn in = linear_in(values, bits, rows, cols, groups, L, fn);
  const float* xp = spmm_buffer<float>(x, fn, "x", L * groups * cols, false, false);
  const float* d = spmm_buffer<float>(dy, fn, "dy", L * rows, false, false);
  float* o = spmm_buffer<float>(out, fn, "out", in.g.nnz, false, true);
  try {
    py::gil_scoped_release release;
    pk::sparse_linear_sddmm(in.g, xp, d, o);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(where(fn) + e.what());
  }
}

void spmm_backward(SPMM_GEOMETRY_ARGS, const py::handle& dy, int64_t head, const py::handle& out) {
  const char* fn = "spmm_backward";
  SpmmIn in = spmm_in(SPMM_GEOMETRY, fn);
  head = spmm_head(head, in.max_shift, fn);
  const float* d = spmm_buffer<float>(dy, fn, "dy", head + rows * L, true, false);
  float* dx = spmm_buffer<float>(out, fn, "out", groups * cols * phases * L, false, true);
  try {
    py::gil_scoped_release release;
    pk::sparse_backward(in.g, d + head, dx);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(where(fn) + e.what());
  }
}

void spmm_sddmm(SPMM_GEOMETRY_ARGS, const py::handle& dy, int64_t head, const py::handle& x,
                const py::handle& out) {
  const char* fn = "spmm_sddmm";
  SpmmIn in = spmm_in(SPMM_GEOMETRY, fn);
  head = spmm_head(head, 0, fn);
  const float* d = spmm_buffer<float>(dy, fn, "dy", head + rows * L, true, false);
  const int64_t planes = groups * cols * phases * L;
  const float* xp = spmm_buffer<float>(x, fn, "x", planes + in.max_shift, true, false);
  float* o = spmm_buffer<float>(out, fn, "out", in.g.nnz, false, true);
  try {
    py::gil_scoped_release release;
    pk::sparse_sddmm(in.g, d + head, xp, o);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(where(fn) + e.what());
  }
}

void spmm_transpose(const py::handle& src, int64_t rows, int64_t cols, const py::handle& out) {
  const char* fn = "transpose";
  if (rows < 0 || cols < 0) {
    throw py::value_error(where(fn) + "expected rows, cols >= 0, got " + std::to_string(rows) +
                          ", " + std::to_string(cols));
  }
  const float* s = spmm_buffer<float>(src, fn, "src", rows * cols, false, false);
  float* d = spmm_buffer<float>(out, fn, "out", rows * cols, false, true);
  py::gil_scoped_release release;
  pk::transpose(s, rows, cols, d);
}

#undef SPMM_GEOMETRY_ARGS
#undef SPMM_GEOMETRY

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++/OpenMP kernels of procrustes_kernels (use procrustes_kernels.ops.update.cpp).";
  // The constants the Python package defines too (common.h); tests/test_cpp_contract.py checks
  // that they agree.
  m.attr("GROUP_SIZE") = pk::kGroupSize;
  m.attr("RADIX_HIGH_BINS") = pk::kRadixHighBins;
  m.attr("RADIX_LOW_BINS") = pk::kRadixLowBins;
  m.attr("HIST_MANTISSA_BITS") = pk::kHistMantissaBits;
  m.attr("HIST_MIN_EXP") = pk::kHistMinExp;
  m.attr("HIST_MAX_EXP") = pk::kHistMaxExp;
  m.attr("HIST_SHIFT") = pk::kHistShift;
  m.attr("HIST_BASE") = pk::kHistBase;
  m.attr("HIST_BINS") = pk::kHistBins;

  m.def("philox_uniform", &philox_uniform, "tl.rand(seed, offsets) for int32 or int64 offsets.",
        py::arg("seed"), py::arg("offsets"));
  m.def("materialize", &materialize,
        "Write elements [start, start + count) of the effective weight (tracked values, else "
        "scale * w0) into out; count -1: up to numel.",
        py::kw_only(), py::arg("seed"), py::arg("bound"), py::arg("scale"), py::arg("values"),
        py::arg("bits"), py::arg("group_ptr"), py::arg("numel"), py::arg("out"),
        py::arg("start") = 0, py::arg("count") = -1);
  def_seg(m, "log_histogram", &log_histogram,
          "Log-bin histogram of the scores. scores: optional numel uint16 buffer of the scores' "
          "upper halves; scores_valid: it holds this step's (read them), else they are stored.",
          seg_kwargs(py::arg("hist_shift"), py::arg("hist_base"), py::arg("hist_bins"),
                     py::arg("scores").none(true) = py::none(), py::arg("scores_valid") = false));
  def_seg(m, "radix_histogram", &radix_histogram,
          "Radix histogram of the scores' bits (high < 0: upper 15 bits); scores and "
          "scores_valid as for log_histogram.",
          seg_kwargs(py::arg("high"), py::arg("scores").none(true) = py::none(),
                     py::arg("scores_valid") = false));
  def_seg(m, "candidates", &candidates, "Dense c, m, s and tracked (outputs may be None but s).",
          seg_kwargs(py::arg("c_out").none(true), py::arg("m_out").none(true), py::arg("s_out"),
                     py::arg("tracked_out").none(true)));
  def_seg(m, "compact", &compact,
          "Keep s > threshold plus the first tie_quota ties: (values, bits, group_ptr, "
          "momentum, ties_used, histogram).",
          seg_kwargs(py::arg("threshold"), py::arg("tie_quota"), py::arg("with_histogram"),
                     py::arg("hist_shift"), py::arg("hist_base"), py::arg("hist_bins"),
                     py::arg("scores").none(true) = py::none()));
  def_seg(m, "compact_mask", &compact_mask,
          "Compaction with an explicit keep mask: (values, bits, group_ptr, momentum).",
          seg_kwargs(py::arg("keep")));
  m.def("paper_walk", &paper_walk,
        "PaperQuantileSelector's sequential walk; writes mask_out, returns the final theta.",
        py::arg("scores"), py::arg("theta"), py::arg("up"), py::arg("down"),
        py::arg("mask_out"));

  m.def("spmm_forward", &spmm_forward,
        "y[rows * L] = W x (+ bias) from the compressed weight, feature-major planes (spmm.h).",
        py::kw_only(), py::arg("values"), py::arg("bits"), py::arg("rows"), py::arg("cols"),
        py::arg("ksize"), py::arg("groups"), py::arg("phases"), py::arg("phase"),
        py::arg("shift"), py::arg("L"), py::arg("x"), py::arg("bias").none(true),
        py::arg("out"));
  m.def("spmm_linear_forward", &spmm_linear_forward,
        "y[L, rows] = x[L, groups * cols] W^T (+ bias) from the compressed weight of a linear "
        "layer, token-major as PyTorch lays them out (spmm.h).",
        py::kw_only(), py::arg("values"), py::arg("bits"), py::arg("rows"), py::arg("cols"),
        py::arg("groups"), py::arg("L"), py::arg("x"), py::arg("bias").none(true),
        py::arg("out"));
  m.def("spmm_linear_backward", &spmm_linear_backward,
        "dx[L, groups * cols] = dy[L, rows] W into out, token-major.", py::kw_only(),
        py::arg("values"), py::arg("bits"), py::arg("rows"), py::arg("cols"), py::arg("groups"),
        py::arg("L"), py::arg("dy"), py::arg("out"));
  m.def("spmm_linear_sddmm", &spmm_linear_sddmm,
        "The weight gradient at every tracked position (storage order) into out, from "
        "token-major x[L, groups * cols] and dy[L, rows].",
        py::kw_only(), py::arg("values"), py::arg("bits"), py::arg("rows"), py::arg("cols"),
        py::arg("groups"), py::arg("L"), py::arg("x"), py::arg("dy"), py::arg("out"));
  m.def("spmm_backward", &spmm_backward,
        "dx = W^T dy into out; dy's first plane starts at element head (zeros before it).",
        py::kw_only(), py::arg("values"), py::arg("bits"), py::arg("rows"), py::arg("cols"),
        py::arg("ksize"), py::arg("groups"), py::arg("phases"), py::arg("phase"),
        py::arg("shift"), py::arg("L"), py::arg("dy"), py::arg("head"), py::arg("out"));
  m.def("spmm_sddmm", &spmm_sddmm,
        "The weight gradient at every tracked position (storage order) into out.",
        py::kw_only(), py::arg("values"), py::arg("bits"), py::arg("rows"), py::arg("cols"),
        py::arg("ksize"), py::arg("groups"), py::arg("phases"), py::arg("phase"),
        py::arg("shift"), py::arg("L"), py::arg("dy"), py::arg("head"), py::arg("x"),
        py::arg("out"));

  m.def("transpose", &spmm_transpose, "out[c * rows + r] = src[r * cols + c] (float32).",
        py::arg("src"), py::arg("rows"), py::arg("cols"), py::arg("out"));

  m.def("max_threads", &pk::max_threads, "Threads the kernels use.");
  m.def(
      "set_max_threads",
      [](int n) {
        if (n < 0) throw py::value_error("set_max_threads(): expected n >= 0, got " + std::to_string(n));
        pk::set_max_threads(n);
      },
      "Threads the kernels use (0: the OpenMP default).", py::arg("n"));
  m.def("hardware_threads", &pk::hardware_threads, "Processors OpenMP sees.");
  m.def("simd_level", &pk::simd_level,
        "Instruction set in use: 0 baseline, 1 AVX2 + FMA, 2 with AVX-512 Philox.");
  m.def("max_simd_level", &pk::max_simd_level, "The highest simd_level this CPU runs.");
  m.def("set_simd_level", &pk::set_simd_level,
        "Cap the instruction set (for tests and comparisons; results never change).",
        py::arg("level"));
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
