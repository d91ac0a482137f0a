// The autograd node of a loss whose kernel writes the gradients of its inputs in the
// forward pass (the vapo loss kernels: every term is elementwise in the inputs, so the
// gradient is known once the tokens are read). Its backward only scales them by the
// incoming gradient. A C++ node because Python's autograd.Function (apply, context,
// a Python backward called from the engine) costs ~50 us per forward + backward on a CPU
// core: more than the loss kernel itself at the micro-batch sizes a trainer uses.
#include <torch/autograd.h>

#include <string>
#include <vector>

#include "ops.h"

namespace vapo {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LossFromGradients : public torch::autograd::Function<LossFromGradients> {
  // inputs[i]: a differentiable input of the loss; grads[i]: d loss / d inputs[i] as the
  // op returns it (in the input's shape, in the kernel's output dtype; an empty (0,)
  // tensor when the forward ran without gradients). Both lists count as inputs of the node, so backward
  // returns 1 + 2 * inputs.size() gradients (+ 1 for the op name).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& loss, at::TensorList inputs,
                            at::TensorList grads, const std::string& op) {
    TORCH_CHECK(inputs.size() == grads.size(), op, ": ", inputs.size(), " inputs but ",
                grads.size(), " gradients");
    std::vector<at::Tensor> saved;
    std::vector<int64_t> dtypes;
    saved.reserve(grads.size());
    dtypes.reserve(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) {
      // A gradient of another shape (none was computed: the forward ran with need_grad
      // off) is saved as undefined: backward names the problem if autograd asks for it.
      const bool fits = grads[i].sizes() == inputs[i].sizes();
      saved.push_back(fits ? grads[i] : at::Tensor());
      dtypes.push_back(static_cast<int64_t>(inputs[i].scalar_type()));
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["dtypes"] = dtypes;
    ctx->saved_data["op"] = op;
    // Not `loss` itself: an input returned as an output comes back as a view, and a view
    // made this way refuses in-place ops (`loss /= accumulation_steps`).
    return loss.detach();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list grads = ctx->get_saved_variables();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    const size_t n = grads.size();
    variable_list out(2 + 2 * n);  // loss, inputs..., grads..., op: undefined = no gradient
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return out;
    for (size_t i = 0; i < n; ++i) {
      if (!ctx->needs_input_grad(1 + i)) continue;
      const auto dtype = static_cast<at::ScalarType>(dtypes[i]);
      const at::Tensor& g = grads[i];
      TORCH_CHECK(g.defined(), "vapo ", ctx->saved_data["op"].toStringRef(),
                  ": a gradient was requested but the forward ran with need_grad=False; "
                  "call the loss with grad mode on");
      out[1 + i] = g.mul(grad_loss.to(g.scalar_type())).to(dtype);
    }
    return out;
  }
};

}  // namespace

at::Tensor loss_from_gradients(const at::Tensor& loss, const std::vector<at::Tensor>& inputs,
                               const std::vector<at::Tensor>& grads, const std::string& op) {
  return LossFromGradients::apply(loss, at::TensorList(inputs), at::TensorList(grads), op);
}

}  // namespace vapo
