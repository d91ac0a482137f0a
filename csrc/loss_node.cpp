// The autograd node of a loss whose kernel writes the gradients of its inputs in the
// forward pass (the vapo loss kernels: every term is elementwise in the inputs, so the
// gradient is known once the tokens are read). Its backward only scales them by the
// incoming gradient. A plain C++ Node rather than torch::autograd::Function: at the
// micro-batch sizes a trainer uses, the per-call cost of the node is more than the loss
// kernel, and a Function's context (an IValue dict, SavedVariables, a second node
// wrapper per output) costs ~10-15 us more per forward + backward on a CPU core than a
// node that holds its tensors itself.
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"

namespace vapo {
namespace {

using torch::autograd::variable_list;

// An autograd node owned the way this torch owns them: c10::intrusive_ptr in recent
// releases, std::shared_ptr before (torch 2.11, the GPU machines' version). set_history
// takes whichever this torch uses.
template <typename T, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
}

constexpr const char* kFreed =
    ": trying to backward through the graph a second time, but its gradients were freed (or "
    "scaled in place) by the first backward; pass retain_graph=True to the first";

// `t` in `dtype`: itself where it already is (Tensor::to would still go through the
// dispatcher, ~0.5 us a call on the per-micro-batch backward).
at::Tensor same_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// `t` is a plain dense CPU tensor holding the one number 1 (the gradient `loss.backward()`
// passes): scaling by it changes no bit (x * 1 is x, NaN and -0 included), so the
// product is skipped. Read only on the CPU (on a GPU the read would sync) and only from
// an ordinary tensor with storage (not a subclass, a functorch or functionalization wrapper,
// or a zero tensor).
bool is_cpu_one(const at::Tensor& t) {
  if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || t.numel() != 1 ||
      !t.has_storage() || t._is_zerotensor() || t.is_conj() || t.is_neg() ||
      t.unsafeGetTensorImpl()->is_python_dispatch() ||
      t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::FuncTorchGradWrapper,
                                               c10::DispatchKey::FuncTorchBatched,
                                               c10::DispatchKey::Functionalize}))) {
    return false;
  }
  switch (t.scalar_type()) {
    case at::kFloat: return *t.const_data_ptr<float>() == 1.0f;
    case at::kDouble: return *t.const_data_ptr<double>() == 1.0;
    default: return false;
  }
}

struct LossFromGradients : public torch::autograd::Node {
  // grads[i]: d loss / d inputs[i] as the kernel wrote it (undefined when the forward ran
  // without gradients); dtypes[i]: the input's dtype, the gradient's dtype on the way out.
  // The grads are kernel outputs without autograd history, held as plain tensors (no
  // SavedVariable bookkeeping, no reference cycle). donated: the caller gave the buffers
  // up (the logits of inplace_backward), so they may be scaled in place though shared.
  LossFromGradients(torch::autograd::edge_list&& next_edges, std::vector<at::Tensor> grads,
                    std::vector<at::ScalarType> dtypes, std::string op, bool donated)
      : Node(std::move(next_edges)),
        grads_(std::move(grads)),
        dtypes_(std::move(dtypes)),
        op_(std::move(op)),
        donated_(donated) {}

  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);  // against release_variables on another thread
    const bool last = will_release_;
    will_release_ = false;  // the engine says so again before each backward that frees
    return scale(grad_outputs, last && post_hooks().empty());
  }

  // Compiled autograd: the gradients are the node's state; the backward traces as plain
  // tensor ops on them (out of place: they are inputs of the traced graph).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(grads_);
    args.collect(dtypes_);
    args.collect(op_);
    args.collect(consumed_);
  }

  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(grads_);
    variable_list out = scale(inputs, /*last=*/false);
    saved.after(grads_);
    return out;
  }

  void will_release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    will_release_ = true;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    grads_.clear();  // token- or logits-sized: free them as soon as the backward is done
    grads_.shrink_to_fit();
    consumed_ = true;
  }

  std::string name() const override { return "vapo::" + op_ + "::LossFromGradients"; }

 private:
  // Whether grads_[i] may be overwritten: this node holds its only reference (nobody can
  // see the change), or its buffer was donated.
  bool owned(const at::Tensor& g) const {
    return donated_ || (g.use_count() == 1 && g.storage().use_count() == 1);
  }

  variable_list scale(const variable_list& grad_outputs, bool last) {
    const size_t n = grads_.size();
    variable_list out(n);  // undefined: no gradient
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return out;
    TORCH_CHECK(!consumed_, "vapo ", op_, kFreed);
    const bool create_graph = torch::autograd::GradMode::is_enabled();
    const bool unit = !create_graph && is_cpu_one(grad_loss);
    bool scaled_in_place = false;
    for (size_t i = 0; i < n; ++i) {
      if (!task_should_compute_output(i)) continue;
      at::Tensor& g = grads_[i];
      TORCH_CHECK(g.defined(), "vapo ", op_, ": a gradient was requested but the forward ran "
                  "with need_grad=False; call the loss with grad mode on");
      // Scaled where it lies on the graph's last backward (the engine frees the node's
      // variables next, and no post-hook can fail the backward after it): no second copy
      // of a logits- or weight-sized gradient. Under retain_graph=True it is kept as it
      // is, for the next backward. A unit gradient (`loss.backward()`) needs no product.
      if (last && !create_graph && owned(g)) {
        if (!unit) g.mul_(same_dtype(grad_loss, g.scalar_type()));
        out[i] = same_dtype(g, dtypes_[i]);
        scaled_in_place = true;
      } else {
        out[i] = same_dtype(g.mul(same_dtype(grad_loss, g.scalar_type())), dtypes_[i]);
      }
    }
    // A backward retried after a failure further down the graph must not scale twice.
    consumed_ = consumed_ || scaled_in_place;
    if (create_graph) {
      // create_graph=True: the gradients are right, but their dependence on the inputs is
      // not in the graph. They come back as outputs of a node that raises when reached,
      // with edges to the inputs (and to the incoming gradient's graph), so anything
      // that differentiates them again, towards whatever, raises rather than let a
      // second-order term go missing.
      torch::autograd::edge_list edges = next_edges();
      if (grad_loss.requires_grad()) edges.push_back(torch::autograd::impl::gradient_edge(grad_loss));
      auto error = make_node<torch::autograd::Error>(
          "vapo " + op_ + ": this gradient is not differentiable (no double backward through it)",
          std::move(edges));
      for (auto& t : out) {
        if (!t.defined()) continue;
        t = t.detach();
        torch::autograd::set_history(t, error);
      }
    }
    return out;
  }

  std::vector<at::Tensor> grads_;
  std::vector<at::ScalarType> dtypes_;
  std::string op_;
  bool donated_;
  bool will_release_ = false;
  bool consumed_ = false;
};

}  // namespace

at::Tensor loss_from_gradients(const at::Tensor& loss, const std::vector<at::Tensor>& inputs,
                               const std::vector<at::Tensor>& grads, const std::string& op,
                               bool donated) {
  TORCH_CHECK(inputs.size() == grads.size(), op, ": ", inputs.size(), " inputs but ",
              grads.size(), " gradients");
  TORCH_CHECK(loss.dim() == 0, op, ": the loss must be a 0-d tensor, got shape ", loss.sizes());
  std::vector<at::Tensor> held;
  std::vector<at::ScalarType> dtypes;
  held.reserve(grads.size());
  dtypes.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    // A gradient of another shape (none was computed: the forward ran with need_grad off)
    // is held as undefined: the backward names the problem if autograd asks for it.
    // detach: the buffer may be an input itself (inplace_backward's logits), whose graph
    // the node must not reach through it.
    held.push_back(grads[i].sizes() == inputs[i].sizes() ? grads[i].detach() : at::Tensor());
    dtypes.push_back(inputs[i].scalar_type());
  }
  // Not `loss` itself: the caller's tensor keeps no history (as a Function's output would
  // not), and the result is a fresh tensor that takes in-place ops (`loss /= steps`).
  at::Tensor out = loss.detach();
  if (!torch::autograd::compute_requires_grad(inputs)) return out;
  auto node = make_node<LossFromGradients>(
      torch::autograd::collect_next_edges(inputs), std::move(held), std::move(dtypes), op,
      donated);
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace vapo
