// A RocksDB slice transform that names a user's rows: the key's first 3 + key[2] bytes
// (partition, 2 bytes big-endian; the user id's length, 1 byte; the user id), as
// `user_prefix` in src/keys.rs lays them out. Registered under "warbler.UserPrefix" so that
// an options string can name it (rust-rocksdb has no setter for the option that uses it).
#include <memory>
#include <mutex>
#include <string>

#include "rocksdb/slice.h"
#include "rocksdb/slice_transform.h"
#include "rocksdb/utilities/object_registry.h"

namespace {

class UserPrefix : public rocksdb::SliceTransform {
 public:
  static const char* kClassName() { return "warbler.UserPrefix"; }
  const char* Name() const override { return kClassName(); }

  rocksdb::Slice Transform(const rocksdb::Slice& key) const override {
    return rocksdb::Slice(key.data(), Length(key));
  }

  bool InDomain(const rocksdb::Slice& key) const override {
    return key.size() >= 3 && key.size() >= Length(key);
  }

 private:
  static size_t Length(const rocksdb::Slice& key) {
    return 3 + static_cast<unsigned char>(key[2]);
  }
};

}  // namespace

extern "C" void warbler_register_user_prefix() {
  static std::once_flag once;
  std::call_once(once, [] {
    rocksdb::ObjectLibrary::Default()->AddFactory<const rocksdb::SliceTransform>(
        UserPrefix::kClassName(),
        [](const std::string& /*uri*/,
           std::unique_ptr<const rocksdb::SliceTransform>* guard,
           std::string* /*errmsg*/) {
          guard->reset(new UserPrefix());
          return guard->get();
        });
  });
}
