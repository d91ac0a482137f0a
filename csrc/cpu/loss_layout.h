// Generated from vapo_kernels/_loss_layout.py by
// `python -m vapo_kernels.build --write-layout`: edit the Python module, not this.
#pragma once

namespace vapo {

constexpr int P_CLIP_LOW = 0;
constexpr int P_CLIP_HIGH = 1;
constexpr int P_DUAL_CLIP = 2;
constexpr int P_RATIO_CLAMP = 3;
constexpr int P_VALUE_CLIP = 4;
constexpr int P_VALUE_CLIP_OPENRLHF = 5;
constexpr int P_KL_KIND = 6;
constexpr int P_KL_STRAIGHT = 7;
constexpr int P_VF_COEF = 8;
constexpr int P_KL_COEF = 9;
constexpr int P_ENTROPY_COEF = 10;
constexpr int P_LM_COEF = 11;
constexpr int P_ROLLOUT_IS = 12;
constexpr int P_ROLLOUT_IS_MASK = 13;
constexpr int P_ROLLOUT_IS_UPPER = 14;
constexpr int P_ROLLOUT_IS_LOWER = 15;
constexpr int NUM_PARAMS = 16;
constexpr int S_PG = 0;
constexpr int S_VF = 1;
constexpr int S_KL = 2;
constexpr int S_ENTROPY = 3;
constexpr int S_LM = 4;
constexpr int S_TOKENS = 5;
constexpr int S_CLIP_LOW = 6;
constexpr int S_CLIP_HIGH = 7;
constexpr int S_DUAL_CLIP = 8;
constexpr int S_NEG_LOG_RATIO = 9;
constexpr int S_K3 = 10;
constexpr int S_RATIO_SUM = 11;
constexpr int S_RATIO_MIN = 12;
constexpr int S_RATIO_MAX = 13;
constexpr int S_VF_CLIP = 14;
constexpr int S_RETURNS = 15;
constexpr int S_RETURNS_SQ = 16;
constexpr int S_VALUE_ERR = 17;
constexpr int S_VALUE_ERR_SQ = 18;
constexpr int S_ROLLOUT_IS_RAW = 19;
constexpr int S_ROLLOUT_IS_WEIGHT = 20;
constexpr int S_ROLLOUT_IS_MIN = 21;
constexpr int S_ROLLOUT_IS_MAX = 22;
constexpr int S_ROLLOUT_IS_OUT = 23;
constexpr int S_ROLLOUT_KL = 24;
constexpr int S_ROLLOUT_K3 = 25;
constexpr int NUM_SUMS = 26;

// LOSS_TERMS: loss = sum_k TERM_SIGN[k] * coefficient_k * sums[TERM_SUM[k]], where
// coefficient_k = params[TERM_PARAM[k]], or 1 where TERM_PARAM[k] < 0.
constexpr int NUM_TERMS = 5;
constexpr int TERM_SUM[NUM_TERMS] = {0, 1, 2, 3, 4};
constexpr int TERM_PARAM[NUM_TERMS] = {-1, 8, 9, 10, 11};
constexpr double TERM_SIGN[NUM_TERMS] = {1.0, 1.0, 1.0, -1.0, 1.0};

}  // namespace vapo
