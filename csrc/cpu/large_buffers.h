// Where the CPU ops' outputs of a megabyte or more come from. On the
// development VM glibc handed every freed block of 1 MB or more back to the
// system (its threshold moves at run time, up to 32 MB), so the next one was
// fresh memory: the first write to each page faults and the kernel zeroes it,
// which costs more than a pass over the tensor (two 1 MB tensors written and
// freed a step took 1.5 ms a step, two of 512 KB 76 us). A training step frees
// its outputs and asks for the same sizes again the next step, so freed
// blocks are kept, up to kMaxCachedBytes, for the next request of the same
// size.
#pragma once

#include <c10/core/Allocator.h>

#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace safebn {
namespace cpu {

class LargeBuffers final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // smaller requests: at::empty, which glibc recycles
  static constexpr size_t kMaxCachedBytes = size_t(1) << 30;
  static constexpr size_t kPage = size_t(4) << 10;
  static constexpr size_t kHugePage = size_t(2) << 20;

  static LargeBuffers& instance() {
    static LargeBuffers* buffers = new LargeBuffers();  // never destroyed: blocks may be freed at exit
    return *buffers;
  }

  c10::DataPtr allocate(size_t bytes) override {
    // Blocks of a huge page or more come in whole huge pages, so that the
    // system can back them with huge pages (a fault per 2 MB, not per 4 KB); the
    // price is the rounding, up to one huge page a block (2.1 MB takes 4 MB).
    const size_t alignment = bytes >= kHugePage ? kHugePage : kPage;
    const size_t size = (bytes + alignment - 1) / alignment * alignment;
    Block* block = take(size);
    if (block == nullptr) {
      auto fresh_block = std::make_unique<Block>(Block{nullptr, size});
      fresh_block->data = fresh(size, alignment);
      block = fresh_block.release();
    }
    return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };

  // New memory; when there is none, the kept blocks are given back first.
  void* fresh(size_t size, size_t alignment) {
    void* data = std::aligned_alloc(alignment, size);
    if (data == nullptr) {
      drop_past(0);
      data = std::aligned_alloc(alignment, size);
    }
    if (data == nullptr) throw std::bad_alloc();
#ifdef __linux__
    if (alignment == kHugePage) madvise(data, size, MADV_HUGEPAGE);  // advice: failure is harmless
#endif
    return data;
  }

  static void release(void* block) { instance().keep(static_cast<Block*>(block)); }

  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->size == size) {
        Block* block = *it;
        free_.erase(it);
        cached_bytes_ -= size;
        return block;
      }
    }
    return nullptr;
  }

  // Keeps a freed block, the most recent first, then drops the least recently
  // freed ones past kMaxCachedBytes. Called from a deleter, which must not
  // throw: a block that cannot be listed is freed.
  void keep(Block* block) {
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_front(block);
      cached_bytes_ += block->size;
    } catch (...) {
      destroy(block);
      return;
    }
    drop_past(kMaxCachedBytes);
  }

  void drop_past(size_t limit) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    while (cached_bytes_ > limit) {
      cached_bytes_ -= free_.back()->size;
      destroy(free_.back());
      free_.pop_back();
    }
  }

  static void destroy(Block* block) noexcept {
    std::free(block->data);
    delete block;
  }

  std::mutex mutex_;
  std::list<Block*> free_;
  size_t cached_bytes_ = 0;
};

}  // namespace cpu
}  // namespace safebn
