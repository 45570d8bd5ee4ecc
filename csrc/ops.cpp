// Operator schemas of craft_ext: the single definition of every compiled op.
//
// Kernels register per backend in csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(craft_ext, CPU, m))
// and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL(craft_ext, CUDA, m)). Fake (meta) kernels and
// the Python API live in craft_ext/ops.py; the pure-PyTorch references in
// craft_ext/reference.py define the semantics every backend must reproduce.

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <vector>

extern "C" {
// `import craft_ext._C` loads this shared object, whose static initialisers register the ops
// below with the dispatcher. The module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "craft_ext compiled kernels (registered with torch.ops.craft_ext)",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(craft_ext, m) {
  // Per-filter statistics of weight [N, ...] viewed as [N, K]: max |w|, sum |w|, mean and
  // standard deviation (correction 0). All four float32 [N]. NaN anywhere in a filter makes
  // its max_abs, l1, mean and std NaN.
  // With running_var (BN folded in, the filter the network applies): each statistic of
  // w_i * s_i, s_i = bn_weight_i / sqrt(running_var_i + eps) in float32 (bn_weight None: 1),
  // i.e. max_abs, l1, std times |s_i| and mean times s_i, one float32 product per filter.
  m.def(
      "filter_stats(Tensor weight, Tensor? bn_weight=None, Tensor? running_var=None, "
      "float eps=1e-05) -> (Tensor, Tensor, Tensor, Tensor)");
  // In-place CRAFT reactivation (Bhatta et al., arXiv 2312.00072, sec. 4.3). Random inputs
  // are drawn by the caller so every backend computes the same function of its inputs:
  //   order_key  float32 [N], uniform [0, 1): random order of the inactive filters
  //   fallback_u float32 [N], uniform [0, 1): donor draw when unspent donors run out
  //   noise      float32, shaped like weight, standard normal (scaled_gaussian / random only)
  // The channel that follows the filters (each an optional [N] tensor, any float dtype):
  // conv bias, BatchNorm weight / bias / running_mean / running_var and PReLU slope. Given
  // entries of reactivated channels are rewritten (reference.CHANNEL_RULES: craft makes the
  // channel the complement of its donor through BN). folded: detect and rank on the filter
  // folded with its BN, max |w_i| * |s_i| and l1_i * |s_i|, s = bn_weight / sqrt(var + eps).
  // Returns (inactive bool [N], reactivated bool [N], donor int64 [N], count int64 []).
  m.def(
      "reactivate_(Tensor(a!) weight, Tensor(b!) used, Tensor order_key, Tensor fallback_u, "
      "Tensor? noise, float threshold, str method, Tensor(c!)? bias=None, "
      "Tensor(d!)? bn_weight=None, Tensor(e!)? bn_bias=None, Tensor(f!)? running_mean=None, "
      "Tensor(g!)? running_var=None, Tensor(h!)? prelu=None, float eps=1e-05, "
      "bool folded=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // reactivate_ as craft_ext.Reactivator runs it after an optimizer step: draws order_key,
  // fallback_u (torch.rand(N) twice) and, except for craft, noise (torch.randn(weight.shape)),
  // all float32, from `generator`; calls reactivate_ (channel arguments as there); zeroes the
  // rows of reactivated filters in every tensor of `state` shaped like weight or [N] (optimizer
  // state of the weight and of the channel entries: momentum, Adam moments; others are left
  // alone) and adds the count to `total` (int64 []). Same returns.
  m.def(
      "reactivate_and_reset_(Tensor(a!) weight, Tensor(b!) used, Tensor(c!) total, "
      "Tensor(d!)[] state, Generator? generator, float threshold, str method, "
      "Tensor(e!)? bias=None, Tensor(f!)? bn_weight=None, Tensor(g!)? bn_bias=None, "
      "Tensor(h!)? running_mean=None, Tensor(i!)? running_var=None, Tensor(j!)? prelu=None, "
      "float eps=1e-05, bool folded=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // Overload .record: reactivate_and_reset_ writing reactivated and donor into row `slot` of
  // reactivated_log (bool [R, N]) and donor_log (int64 [R, N]) instead of returning them: the
  // per-step hook of craft_ext.Reactivator, which keeps its pending events in such logs.
  m.def(
      "reactivate_and_reset_.record(Tensor(a!) weight, Tensor(b!) used, Tensor(c!) total, "
      "Tensor(d!)[] state, Tensor(e!) reactivated_log, Tensor(f!) donor_log, int slot, "
      "Generator? generator, float threshold, str method, Tensor(g!)? bias=None, "
      "Tensor(h!)? bn_weight=None, Tensor(i!)? bn_bias=None, Tensor(j!)? running_mean=None, "
      "Tensor(k!)? running_var=None, Tensor(l!)? prelu=None, float eps=1e-05, "
      "bool folded=False) -> ()");
  // Feature-map statistics of fmap [B, C, H, W] (Diba & Khosravi, IASC 2023): per-map sums
  // float32 [B, C]; Pearson correlations of the maps of each sample, float32 [B, C, C] when
  // return_corr (else an empty [B, 0, 0]); empty = |sum| <= sum_threshold and redundant = some
  // k < i has corr[b, i, k] >= corr_threshold, both bool [B, C].
  m.def(
      "feature_map_stats(Tensor fmap, float sum_threshold, float corr_threshold, "
      "bool return_corr) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

// ADInplaceOrView kernel of the ops that write their arguments in place: runs the op, then bumps
// the version counter of every input annotated (x!) in the schema (tensor lists included), as
// torch's own in-place ops do (the Triton ops get this from torch.library). Autograd then refuses
// a backward pass through a weight that was reactivated after the forward pass saved it, instead
// of silently using the new values. (torch's boxed autogradNotImplementedInplaceOrViewFallback
// bumps only outputs that alias an input, and these ops return fresh tensors.)
void bump_mutated_inputs(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t start = stack->size() - arguments.size();
  std::vector<at::Tensor> mutated;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[start + i];
    if (value.isTensor()) {
      mutated.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorVector()) mutated.push_back(t);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : mutated) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(craft_ext, ADInplaceOrView, m) {
  m.impl("reactivate_", torch::CppFunction::makeFromBoxedFunction<&bump_mutated_inputs>());
  m.impl("reactivate_and_reset_",
         torch::CppFunction::makeFromBoxedFunction<&bump_mutated_inputs>());
  m.impl("reactivate_and_reset_.record",
         torch::CppFunction::makeFromBoxedFunction<&bump_mutated_inputs>());
}
