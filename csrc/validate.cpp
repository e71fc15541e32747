#include "validate.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "adagrad8/quant.h"

namespace adagrad8 {
namespace {

// torch-style dtype names ("float32"), as Python prints them without the "torch." prefix.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kComplexHalf: return "complex32";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string num_str(double v) {  // "%g", as Python's f"{v:g}"
  if (std::isnan(v)) return "nan";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string at_index(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// An argument's name for a message, "params[3]" or "lr", written only when a check fails: the checks
// run on every step, for every tensor, and building the strings cost more than the checks.
struct Name {
  const char* list;
  int64_t index;  // -1: not a list
};
std::ostream& operator<<(std::ostream& os, const Name& n) {
  os << n.list;
  if (n.index >= 0) os << '[' << n.index << ']';
  return os;
}
Name named(const char* name) { return {name, -1}; }
Name named(const char* list, size_t i) { return {list, static_cast<int64_t>(i)}; }

void check_lengths(const char* name, size_t n, size_t expected) {
  TORCH_CHECK_VALUE(n == expected, name, " has ", n, " tensors but params has ", expected);
}

void check_device(Name name, const at::Tensor& t, const at::Tensor& ref, Name ref_name = named("params", 0)) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device().str(), " but ", ref_name, " is on ",
                    ref.device().str());
}

// A 0-dim or one-element tensor of the given dtype.
void check_scalar(Name name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " is sparse; only dense tensors are supported");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.numel() == 1, name, " must hold one ", dtype_name(dtype),
                    " value, got ", dtype_name(t.scalar_type()), " with ", t.numel(), " elements");
}

void check_hyper(const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, name, " must be finite and >= 0, got ", num_str(v));
}

// state tensor i has the param's shape, the given dtype, and is contiguous.
void check_like_param(Name name, const at::Tensor& t, const at::Tensor& p, size_t i, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " is sparse; only dense tensors are supported");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " has dtype ", dtype_name(t.scalar_type()),
                    " but must be ", dtype_name(dtype));
  TORCH_CHECK_VALUE(t.sizes() == p.sizes(), name, " has shape ", shape_str(t.sizes()), " but params[", i,
                    "] has shape ", shape_str(p.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_optional_scalars(const char* name, const std::optional<at::TensorList>& list, size_t n,
                            const at::Tensor& ref, at::ScalarType dtype) {
  if (!list.has_value()) return;
  check_lengths(name, list->size(), n);
  for (size_t i = 0; i < n; ++i) {
    check_device(named(name, i), (*list)[i], ref);
    check_scalar(named(name, i), (*list)[i], dtype);
  }
}

// A map's values, read only where that is free: on the host (elsewhere it would sync). Finite, in
// [-1, 1] and sorted, which the encoders' searches assume. _checks.py's map_values.
void check_map_values(const at::Tensor& qmap) {
  if (!qmap.device().is_cpu()) return;
  const float* q = qmap.const_data_ptr<float>();
  const char* rule = "; map values must be finite, in [-1, 1] and sorted";
  for (int i = 0; i < kMapSize; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(q[i]) && q[i] >= -1.0f && q[i] <= 1.0f, "qmap[", i, "] is ", num_str(q[i]), rule);
  }
  for (int i = 0; i + 1 < kMapSize; ++i) {
    TORCH_CHECK_VALUE(q[i] <= q[i + 1], "qmap[", i, "] = ", num_str(q[i]), " > qmap[", i + 1, "] = ",
                      num_str(q[i + 1]), rule);
  }
}

// Arguments that share memory. A tensor the op writes must not overlap any other argument (its
// result would depend on the order of reads and writes); arguments it only reads may share.
// Each argument gets an order number (its position in the op's argument list, lists flattened).
// A sweep per storage finds, for each span that overlaps an earlier one, one partner (the
// furthest-ending earlier span); of those pairs the one reported is the first by (later order,
// earlier order). That does not depend on where storages lie, so _checks.py's Overlaps, running
// the same sweep, reports the same pair. (Not necessarily the first of all overlapping pairs.)
class Overlaps {
 public:
  void add(const char* name, at::TensorList tensors, bool writes) {
    segments_.push_back({name, next_, static_cast<int>(tensors.size()), true});
    for (const at::Tensor& t : tensors) add_one(t, writes);
  }
  void add(const char* name, const at::Tensor& t, bool writes) {
    segments_.push_back({name, next_, 1, false});
    add_one(t, writes);
  }

  void check() {
    // Within a storage, by start then order; a span overlaps an earlier one iff it starts before
    // the furthest end so far (of any span if it writes, of a written span if it only reads).
    std::sort(spans_.begin(), spans_.end(), [](const Span& a, const Span& b) {
      return std::tie(a.storage, a.begin, a.order) < std::tie(b.storage, b.begin, b.order);
    });
    std::pair<int, int> found{-1, -1};  // (later, earlier) order of the pair to report
    const Span* any = nullptr;           // furthest-ending span of this storage so far
    const Span* written = nullptr;       // the same among written spans
    for (size_t k = 0; k < spans_.size(); ++k) {
      const Span& s = spans_[k];
      if (k > 0 && s.storage != spans_[k - 1].storage) any = written = nullptr;
      const Span* other = s.writes ? any : written;
      if (other != nullptr && s.begin < other->end) {
        const std::pair<int, int> pair{std::max(s.order, other->order), std::min(s.order, other->order)};
        if (found.first < 0 || pair < found) found = pair;
      }
      if (any == nullptr || s.end > any->end) any = &s;
      if (s.writes && (written == nullptr || s.end > written->end)) written = &s;
    }
    TORCH_CHECK_VALUE(found.first < 0, name_of(found.second), " and ", name_of(found.first), " overlap in memory; ",
                      "a tensor the step writes must not share memory with another argument");
  }

 private:
  struct Span {
    const void* storage;
    int64_t begin, end;  // bytes into the storage
    int order;
    bool writes;
  };
  struct Segment {
    const char* name;
    int first, count;
    bool list;
  };

  void add_one(const at::Tensor& t, bool writes) {
    const int order = next_++;
    if (t.numel() == 0) return;  // every argument is dense by now: it has a storage
    const int64_t begin = t.storage_offset() * static_cast<int64_t>(t.itemsize());
    spans_.push_back({t.storage().unsafeGetStorageImpl(), begin,
                      begin + t.numel() * static_cast<int64_t>(t.itemsize()), order, writes});
  }

  std::string name_of(int order) const {
    for (const Segment& s : segments_) {
      if (order < s.first + s.count) return s.list ? at_index(s.name, order - s.first) : s.name;
    }
    return "?";
  }

  std::vector<Span> spans_;
  std::vector<Segment> segments_;
  int next_ = 0;
};

void add_optional(Overlaps& o, const char* name, const std::optional<at::TensorList>& list) {
  o.add(name, list.has_value() ? *list : at::TensorList(), false);
}

}  // namespace

int64_t scale_count(int64_t numel, int64_t block_size) {
  return block_size == 0 ? 1 : (numel + block_size - 1) / block_size;
}

void check_common(at::TensorList params, at::TensorList grads, const char* state_name,
                  at::TensorList state, at::TensorList steps, const at::Tensor& lr, double lr_decay,
                  double weight_decay, double eps, const std::optional<at::TensorList>& gnorm_scales) {
  const size_t n = params.size();
  check_lengths("grads", grads.size(), n);
  check_lengths(state_name, state.size(), n);
  check_lengths("steps", steps.size(), n);
  check_scalar(named("lr"), lr, at::kFloat);
  check_hyper("lr_decay", lr_decay);
  check_hyper("weight_decay", weight_decay);
  check_hyper("eps", eps);
  if (n == 0) return;
  const at::Tensor& p0 = params[0];
  check_device(named("lr"), lr, p0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const Name pname = named("params", i);
    check_device(pname, p, p0);
    TORCH_CHECK_VALUE(p.layout() == at::kStrided, pname, " is sparse; only dense tensors are supported");
    const auto dt = p.scalar_type();
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, pname, " has dtype ",
                      dtype_name(dt), " but must be float32, float16 or bfloat16");
    TORCH_CHECK_VALUE(dt == p0.scalar_type(), pname, " has dtype ", dtype_name(dt), " but params[0] has dtype ",
                      dtype_name(p0.scalar_type()));
    TORCH_CHECK_VALUE(p.is_contiguous(), pname, " must be contiguous");
    check_device(named("grads", i), grads[i], p0);
    check_like_param(named("grads", i), grads[i], p, i, dt);
    check_device(named(state_name, i), state[i], p0);
    check_device(named("steps", i), steps[i], p0);
    check_scalar(named("steps", i), steps[i], at::kFloat);
  }
  check_optional_scalars("gnorm_scales", gnorm_scales, n, p0, at::kFloat);
}

void check_step(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
                const at::Tensor& lr, double lr_decay, double weight_decay, double eps,
                const std::optional<at::TensorList>& gnorm_scales) {
  check_common(params, grads, "state_sums", state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales);
  for (size_t i = 0; i < params.size(); ++i) {
    check_like_param(named("state_sums", i), state_sums[i], params[i], i, at::kFloat);
  }
  Overlaps o;  // in argument order
  o.add("params", params, true);
  o.add("grads", grads, false);
  o.add("state_sums", state_sums, true);
  o.add("steps", steps, false);
  o.add("lr", lr, false);
  add_optional(o, "gnorm_scales", gnorm_scales);
  o.check();
}

void check_step_quantized(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                          const at::Tensor& qmap, at::TensorList steps, const at::Tensor& lr, double lr_decay,
                          double weight_decay, double eps, const std::optional<at::TensorList>& gnorm_scales,
                          int64_t block_size, const std::optional<at::TensorList>& seeds) {
  check_common(params, grads, "codes", codes, steps, lr, lr_decay, weight_decay, eps, gnorm_scales);
  const size_t n = params.size();
  check_lengths("absmax", absmax.size(), n);
  TORCH_CHECK_VALUE(block_size >= 0, "block_size must be >= 1, or 0 for one block per tensor, got ", block_size);
  TORCH_CHECK_VALUE(qmap.scalar_type() == at::kFloat && qmap.numel() == kMapSize && qmap.is_contiguous(),
                    "qmap must be a contiguous float32 tensor of ", kMapSize, " elements, got ", dtype_name(qmap.scalar_type()),
                    " with ", qmap.numel(), " elements");
  if (n == 0) return;
  check_device(named("qmap"), qmap, params[0]);
  for (size_t i = 0; i < n; ++i) {
    check_like_param(named("codes", i), codes[i], params[i], i, at::kByte);
    const Name aname = named("absmax", i);
    check_device(aname, absmax[i], params[0]);
    const int64_t need = scale_count(params[i].numel(), block_size);
    TORCH_CHECK_VALUE(absmax[i].scalar_type() == at::kFloat && absmax[i].is_contiguous(), aname,
                      " must be a contiguous float32 tensor");
    TORCH_CHECK_VALUE(absmax[i].numel() == need, aname, " has ", absmax[i].numel(), " elements but params[", i,
                      "] needs ", need, " for block_size ", block_size);
  }
  check_optional_scalars("seeds", seeds, n, params[0], at::kLong);
  check_map_values(qmap);
  Overlaps o;  // in argument order
  o.add("params", params, true);
  o.add("grads", grads, false);
  o.add("codes", codes, true);
  o.add("absmax", absmax, true);
  o.add("qmap", qmap, false);
  o.add("steps", steps, false);
  o.add("lr", lr, false);
  add_optional(o, "gnorm_scales", gnorm_scales);
  add_optional(o, "seeds", seeds);
  o.check();
}

void check_counts(at::TensorList counts) {
  for (size_t i = 0; i < counts.size(); ++i) {
    check_device(named("counts", i), counts[i], counts[0], named("counts", 0));
    check_scalar(named("counts", i), counts[i], at::kFloat);
  }
}

void check_overlaps(at::TensorList written, at::TensorList read, const c10::List<std::string>& names) {
  const size_t n = written.size() + read.size();
  TORCH_CHECK_VALUE(names.empty() || names.size() == n, "names has ", names.size(), " entries but there are ", n,
                    " tensors; give one name per tensor (written, then read) or none");
  const std::vector<std::string> kept(names.begin(), names.end());  // declared before o, which points into it
  auto tensor = [&](size_t i) -> const at::Tensor& { return i < written.size() ? written[i] : read[i - written.size()]; };
  auto name = [&](size_t i) {
    return !kept.empty() ? kept[i] : i < written.size() ? at_index("written", i) : at_index("read", i - written.size());
  };
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(tensor(i).layout() == at::kStrided, name(i), " is sparse; only dense tensors are supported");
  }
  Overlaps o;  // written, then read
  if (kept.empty()) {
    o.add("written", written, true);
    o.add("read", read, false);
  } else {
    for (size_t i = 0; i < n; ++i) o.add(kept[i].c_str(), tensor(i), i < written.size());
  }
  o.check();
}

void check_percentile_clip(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                           int64_t percentile) {
  const size_t n = grads.size();
  TORCH_CHECK_VALUE(gnorm_vecs.size() == n, "gnorm_vecs has ", gnorm_vecs.size(), " tensors but grads has ", n);
  TORCH_CHECK_VALUE(steps.size() == n, "steps has ", steps.size(), " tensors but grads has ", n);
  TORCH_CHECK_VALUE(percentile >= 1 && percentile <= 99, "percentile must be in [1, 99], got ", percentile);
  for (size_t i = 0; i < n; ++i) {
    const Name gname = named("grads", i);
    const Name vname = named("gnorm_vecs", i);
    const at::Tensor& g = grads[i];
    check_device(gname, g, grads[0], named("grads", 0));
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, gname, " is sparse; only dense tensors are supported");
    const auto dt = g.scalar_type();
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, gname, " has dtype ",
                      dtype_name(dt), " but must be float32, float16 or bfloat16");
    check_device(vname, gnorm_vecs[i], g, gname);
    TORCH_CHECK_VALUE(gnorm_vecs[i].scalar_type() == at::kFloat && gnorm_vecs[i].dim() == 1 &&
                          gnorm_vecs[i].numel() == kHistory && gnorm_vecs[i].is_contiguous(),
                      vname, " must be a contiguous float32 tensor of shape [", kHistory, "], got ",
                      dtype_name(gnorm_vecs[i].scalar_type()), " of shape ", shape_str(gnorm_vecs[i].sizes()));
    check_device(named("steps", i), steps[i], g, gname);
    check_scalar(named("steps", i), steps[i], at::kFloat);
  }
  Overlaps o;  // in argument order
  o.add("grads", grads, false);
  o.add("gnorm_vecs", gnorm_vecs, true);
  o.add("steps", steps, false);
  o.check();
}

}  // namespace adagrad8
