// The two loops of the placement decision (placement/packing.py), native: the greedy packing of
// sorted items into packs and the swap refinement. Each is the numpy reference's algorithm step for
// step, with the same floating-point operations in the same order, so both give the same plan
// (tests/test_placement.py compares them). Plain C++, no Python, no XLA: layers are independent
// problems and run one after another. Arrays are C-contiguous, shapes in the comments.
#ifndef JEM_CSRC_PLACEMENT_H_
#define JEM_CSRC_PLACEMENT_H_

#include <cstdint>

namespace jem {
namespace placement {

// replicate_experts: loads [L, E] -> logcnt [L, E] (out). Every expert one replica, then `extra`
// more one at a time, each to the largest load / replicas (ties: fewer replicas, then lower id), none
// past max_count.
void ReplicateExperts(int64_t layers, int64_t experts, int64_t extra, int64_t max_count, const double* loads,
                      int64_t* logcnt);

// balanced_packing's greedy loop over items already sorted heaviest first (see packing.py).
//   weight [L, M], key [L, M] (num_keys = unconstrained), present [L, M]: per sorted item
//   sizes [L, P] items each pack takes, shares [P] (normalised), fair_limit [L]
//   load [L, P] (in/out), holds [L, num_keys + 1, P] (in/out), preferred [L, num_keys + 1, P] or null
//   pack_of_item [L, M] (out): the pack of each sorted item, -1 where not present
void PackSorted(int64_t layers, int64_t items, int64_t packs, int64_t num_keys, const double* weight,
                const int64_t* key, const bool* present, const int64_t* sizes, const double* shares,
                const double* fair_limit, const bool* preferred, double* load, bool* holds,
                int64_t* pack_of_item);

// refine_by_swaps (see packing.py). expert [L, P, S] (-1 empty), weight [L, P, S], both in/out;
// target_max [L] or null; move_cost [L, P, S] or null (in/out); swaps [L] (out).
void RefineBySwaps(int64_t layers, int64_t packs, int64_t slots, int64_t partners, int64_t max_rounds,
                   int64_t* expert, double* weight, const double* target_max, double* move_cost,
                   int64_t* swaps);

}  // namespace placement
}  // namespace jem

#endif  // JEM_CSRC_PLACEMENT_H_
