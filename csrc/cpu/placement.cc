// Native loops of the placement decision; the reference is jax_elastic_moe/placement/packing.py.
#include "csrc/placement.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace jem {
namespace placement {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kUnreached = 4.0;  // packing.py: _UNREACHED
}  // namespace

void ReplicateExperts(int64_t layers, int64_t experts, int64_t extra, int64_t max_count, const double* loads,
                      int64_t* logcnt) {
  struct Candidate {
    double priority;
    int64_t count, expert;
  };
  // std heaps pop the largest: a candidate ranks higher with a larger priority, then fewer replicas,
  // then a lower id
  auto lower = [](const Candidate& a, const Candidate& b) {
    if (a.priority != b.priority) return a.priority < b.priority;
    if (a.count != b.count) return a.count > b.count;
    return a.expert > b.expert;
  };
  std::vector<Candidate> heap;
  for (int64_t l = 0; l < layers; ++l) {
    const double* load = loads + l * experts;
    int64_t* count = logcnt + l * experts;
    heap.clear();
    for (int64_t e = 0; e < experts; ++e) {
      count[e] = 1;
      if (max_count > 1) heap.push_back({load[e], 1, e});
    }
    std::make_heap(heap.begin(), heap.end(), lower);
    for (int64_t given = 0; given < extra && !heap.empty(); ++given) {
      std::pop_heap(heap.begin(), heap.end(), lower);
      Candidate& top = heap.back();
      count[top.expert] = top.count + 1;
      if (top.count + 1 < max_count) {
        top = {load[top.expert] / double(top.count + 1), top.count + 1, top.expert};
        std::push_heap(heap.begin(), heap.end(), lower);
      } else {
        heap.pop_back();
      }
    }
  }
}

void PackSorted(int64_t layers, int64_t items, int64_t packs, int64_t num_keys, const double* weight,
                const int64_t* key, const bool* present, const int64_t* sizes, const double* shares,
                const double* fair_limit, const bool* preferred, double* load, bool* holds,
                int64_t* pack_of_item) {
  const int64_t key_rows = num_keys + 1;
  std::vector<int64_t> count(packs);
  std::vector<double> level(packs);
  std::vector<char> candidate(packs);
  for (int64_t l = 0; l < layers; ++l) {
    std::fill(count.begin(), count.end(), 0);
    double* pack_load = load + l * packs;
    const int64_t* size = sizes + l * packs;
    for (int64_t j = 0; j < items; ++j) {
      const int64_t at = l * items + j;
      pack_of_item[at] = -1;
      if (!present[at]) continue;
      const double w = weight[at];
      const int64_t k = key[at];
      const bool* held = holds + (l * key_rows + k) * packs;
      bool any_apart = false;
      for (int64_t p = 0; p < packs; ++p) any_apart |= count[p] < size[p] && !held[p];
      double best = kInf;
      for (int64_t p = 0; p < packs; ++p) {
        const bool room = count[p] < size[p];
        candidate[p] = any_apart ? (room && !held[p]) : room;
        level[p] = candidate[p] ? (pack_load[p] + w) / shares[p] : kInf;
        best = std::min(best, level[p]);
      }
      int64_t choice = -1;
      for (int64_t p = 0; p < packs; ++p) {
        if (level[p] == best && (choice < 0 || count[p] < count[choice])) choice = p;
      }
      if (preferred != nullptr) {
        const bool* prefer = preferred + (l * key_rows + k) * packs;
        int64_t stay = 0;
        double stay_level = kInf;
        for (int64_t p = 0; p < packs; ++p) {
          const double v = candidate[p] && prefer[p] ? level[p] : kInf;
          if (v < stay_level) stay = p, stay_level = v;
        }
        if (stay_level <= std::max(fair_limit[l], best)) choice = stay;
      }
      pack_of_item[at] = choice;
      pack_load[choice] += w;
      count[choice] += 1;
      if (k < num_keys) holds[(l * key_rows + k) * packs + choice] = true;
    }
  }
}

void RefineBySwaps(int64_t layers, int64_t packs, int64_t slots, int64_t partners, int64_t max_rounds,
                   int64_t* expert, double* weight, const double* target_max, double* move_cost,
                   int64_t* swaps) {
  const int64_t width = packs > partners ? partners : packs;
  const int64_t n = layers * packs * slots;
  std::fill(swaps, swaps + layers, 0);
  if (n == 0) return;  // nothing to swap
  const int64_t ids = std::max<int64_t>(1, *std::max_element(expert, expert + n) + 1);  // expert ids < ids
  std::vector<int> h_count(ids), g_count(ids);  // replicas of each id in the heavy pack / a partner
  std::vector<double> load(packs);
  std::vector<int64_t> order(packs);
  std::vector<int> net_h(slots), net_g(slots);
  const bool costed = move_cost != nullptr && target_max != nullptr;
  for (int64_t l = 0; l < layers; ++l) {
    int64_t* ex = expert + l * packs * slots;
    double* wt = weight + l * packs * slots;
    double* mc = move_cost == nullptr ? nullptr : move_cost + l * packs * slots;
    for (int64_t round = 0; round < max_rounds; ++round) {
      for (int64_t p = 0; p < packs; ++p) {  // left to right, as packing.py's _slot_sums
        double s = wt[p * slots];
        for (int64_t i = 1; i < slots; ++i) s += wt[p * slots + i];
        load[p] = s;
      }
      const int64_t heavy = std::max_element(load.begin(), load.end()) - load.begin();
      const double top = load[heavy];
      if (target_max != nullptr && !(top > target_max[l])) break;
      std::iota(order.begin(), order.end(), 0);
      if (packs > partners) {  // the lightest packs, by (load, index): a stable argsort's first ones
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return load[a] < load[b]; });
      }
      const int64_t* h_ex = ex + heavy * slots;
      const double* h_wt = wt + heavy * slots;
      for (int64_t i = 0; i < slots; ++i) {
        if (h_ex[i] >= 0) ++h_count[h_ex[i]];
      }
      // the score is (pair max / top) [+ cost], rounded monotonically in both: a candidate whose pair
      // max and cost are both >= the best one's cannot score strictly lower, and is not computed
      double best = kInf, best_pair = kInf, best_cost = kInf;
      int64_t best_pack = -1, best_h = -1, best_g = -1;
      for (int64_t c = 0; c < width; ++c) {
        const int64_t g = order[c];
        if (g == heavy) continue;  // barred
        const int64_t* g_ex = ex + g * slots;
        const double* g_wt = wt + g * slots;
        for (int64_t j = 0; j < slots; ++j) {
          if (g_ex[j] >= 0) ++g_count[g_ex[j]];
        }
        // a swap may not add replicas of one expert sharing a pack: (the other pack has it) - (it is
        // duplicated here), per slot of each side; the swap is barred when the two sum above zero
        for (int64_t i = 0; i < slots; ++i) {
          const int64_t e = h_ex[i];
          net_h[i] = e < 0 ? 0 : int(g_count[e] > 0) - int(h_count[e] >= 2);
        }
        for (int64_t j = 0; j < slots; ++j) {
          const int64_t e = g_ex[j];
          net_g[j] = e < 0 ? 0 : int(h_count[e] > 0) - int(g_count[e] >= 2);
        }
        for (int64_t j = 0; j < slots; ++j) {
          if (g_ex[j] >= 0) --g_count[g_ex[j]];
        }
        const double g_load = load[g];
        for (int64_t i = 0; i < slots; ++i) {
          for (int64_t j = 0; j < slots; ++j) {
            if (net_h[i] + net_g[j] > 0) continue;
            const double delta = h_wt[i] - g_wt[j];
            const double pair_max = std::max(top - delta, g_load + delta);
            if (pair_max >= top * (1 - 1e-12)) continue;
            double cost = 0.0;
            if (costed) cost = pair_max <= target_max[l] ? mc[heavy * slots + i] + mc[g * slots + j] : kUnreached;
            if (pair_max >= best_pair && cost >= best_cost) continue;
            double score = pair_max / top;
            if (costed) score += cost;
            if (score < best) best = score, best_pair = pair_max, best_cost = cost, best_pack = g, best_h = i, best_g = j;
          }
        }
      }
      for (int64_t i = 0; i < slots; ++i) {
        if (h_ex[i] >= 0) --h_count[h_ex[i]];
      }
      if (best_pack < 0) break;
      std::swap(ex[heavy * slots + best_h], ex[best_pack * slots + best_g]);
      std::swap(wt[heavy * slots + best_h], wt[best_pack * slots + best_g]);
      if (mc != nullptr) mc[heavy * slots + best_h] = mc[best_pack * slots + best_g] = 0.0;
      swaps[l] += 1;
    }
  }
}

}  // namespace placement
}  // namespace jem
