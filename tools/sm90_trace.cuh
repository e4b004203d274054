// Phase timeline of the sm90 attention consumers, for kernel work (included by csrc/sm90/attn_kernel.cuh only
// when SAGE3_SM90_TRACE=1, which only the standalone harness tools/sm90_attn_trace.cu sets; the extension never
// does). Lane 0 of the first warp of each consumer warpgroup of CTA (0, 0, 0) records clock64() at fixed points
// of each key tile's step, so one run shows where a tile's cycles go (softmax, waiting for the exp2 turn,
// waiting for the wgmma groups).
#pragma once

namespace sage3::sm90 {

enum TracePoint : int {     // for key tile j
  kTraceStepStart = 0,      // softmax of tile j starts (S_j landed)
  kTraceMaxDone,            // row max reduced (integer max, shuffles) -> waits for the exp2 turn
  kTraceTurnAcquired,       // the exp2 turn is this warpgroup's (the other one handed over)
  kTraceSoftmaxDone,        // exponentials of tile j done, turn handed over
  kTraceIssueStart,         // O_{j-1} added, P_j packed: issuing S_{j+1} and O_j starts
  kTraceIssueDone,          // S_{j+1} and O_j issued
  kTraceNextScoresLanded,   // S_{j+1} landed (softmax of tile j+1 starts right after)
  kTraceStepEnd,            // O_j landed and added, P_{j+1} packed
  kTracePoints
};
constexpr int kTraceTiles = 48;

__device__ unsigned long long g_attn_trace[2][kTraceTiles][kTracePoints];
#define SAGE3_TRACE(cw, tile, point)                                                                   \
  do {                                                                                                \
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && (threadIdx.x % 128) == 0 &&        \
        (tile) < ::sage3::sm90::kTraceTiles)                                                          \
      ::sage3::sm90::g_attn_trace[(cw)][(tile)][(point)] = clock64();                                \
  } while (0)

}  // namespace sage3::sm90
