package prefix

import (
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
)

// TestAPIProperty calls every exported function and method of prefix with extreme arguments:
// nothing panics and every error is typed.
func TestAPIProperty(t *testing.T) {
	s := &apitest.Suite{
		Dir:   ".",
		Funcs: []any{Root, Keys, VLLMNoneHash, VLLMKeys, NewKeyer},
		Types: []any{Key{}, (*Hasher)(nil), (*VLLMHasher)(nil), (*Keyer)(nil), (*Feed)(nil), (*Subscription)(nil), EventKind(0), (*Journal)(nil)},
		Values: func(t reflect.Type) []apitest.Maker {
			val := func(x any) apitest.Maker {
				return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
			}
			switch t {
			case reflect.TypeFor[*Hasher]():
				return []apitest.Maker{val(&Hasher{})}
			case reflect.TypeFor[*VLLMHasher]():
				return []apitest.Maker{val(&VLLMHasher{})}
			case reflect.TypeFor[*Keyer]():
				return []apitest.Maker{val(&Keyer{}), val(NewKeyer(Scheme{VLLM: true, Seed: "0", LoRANames: map[uint64]string{1: "a"}}))}
			case reflect.TypeFor[Scheme]():
				return []apitest.Maker{val(Scheme{}), val(Scheme{VLLM: true, LoRANames: map[uint64]string{1<<64 - 1: "max"}})}
			case reflect.TypeFor[VLLMExtra]():
				return []apitest.Maker{val(VLLMExtra{LoRAName: "sql-lora", CacheSalt: "tenant"})}
			case reflect.TypeFor[*Feed]():
				return []apitest.Maker{func() apitest.Object {
					f := &Feed{}
					_, _ = f.Subscribe(2)
					return apitest.Object{V: reflect.ValueOf(f)}
				}}
			case reflect.TypeFor[*Subscription]():
				return []apitest.Maker{func() apitest.Object {
					var f Feed
					s, _ := f.Subscribe(2)
					f.Publish(Event{Kind: BlockStored}, Event{Kind: BlockStored}, Event{Kind: BlockStored})
					return apitest.Object{V: reflect.ValueOf(s)}
				}, val(&Subscription{})}
			case reflect.TypeFor[*Journal]():
				return []apitest.Maker{val(&Journal{}), func() apitest.Object {
					var j Journal
					j.Append(&Event{Kind: BlockRemoved, Keys: []Key{{1}}, Medium: MediumCPU})
					j.Seal()
					j.Append(&Event{Kind: BlockStored, Keys: []Key{{2}}, Tokens: []Token{-1, 1 << 30}, BlockSize: 1<<63 - 1,
						Medium: "tier@" + string(rune(0x10FFFF)), GroupKind: "x", Group: -1, Lost: 1<<64 - 1})
					return apitest.Object{V: reflect.ValueOf(&j)}
				}}
			case reflect.TypeFor[*Event]():
				return []apitest.Maker{val(&Event{}), val(&Event{Kind: EventKind(255), Keys: make([]Key, 3), Medium: MediumGPU,
					SlidingWindow: -1 << 63, Adapter: 1<<64 - 1, HasGroup: true})}
			case reflect.TypeFor[Namespace]():
				return []apitest.Maker{val(Namespace{Adapter: 1<<64 - 1, Salt: "s"})}
			}
			return nil
		},
	}
	s.Check(t)
}
