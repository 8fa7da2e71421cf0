package tier_test

import (
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// TestAPIProperty calls every exported function and method of tier with extreme arguments:
// nothing panics and every error is typed.
func TestAPIProperty(t *testing.T) {
	valid, err := tier.Encode(nil, tier.Fingerprint{1}, tier.Block{NS: prefix.Namespace{Salt: "s"}, Data: make([]byte, 64)})
	if err != nil {
		t.Fatal(err)
	}
	s := &apitest.Suite{
		Dir:   ".",
		Funcs: []any{tier.Encode, tier.ParseHeader, tier.Check, tier.HeaderSize},
		Types: []any{(*tier.CorruptError)(nil), (*tier.MismatchError)(nil)},
		Values: func(ty reflect.Type) []apitest.Maker {
			val := func(x any) apitest.Maker {
				return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
			}
			switch ty {
			case reflect.TypeFor[[]byte]():
				return []apitest.Maker{val(append([]byte(nil), valid...)), val(valid[:100]), val([]byte(nil))}
			case reflect.TypeFor[tier.Block]():
				return []apitest.Maker{val(tier.Block{Data: make([]byte, 64)}),
					val(tier.Block{NS: prefix.Namespace{Salt: string(make([]byte, tier.MaxSalt+1))}})}
			case reflect.TypeFor[tier.Fingerprint]():
				return []apitest.Maker{val(tier.Fingerprint{1}), val(tier.Fingerprint{})}
			case reflect.TypeFor[prefix.Namespace]():
				return []apitest.Maker{val(prefix.Namespace{Salt: "s"}), val(prefix.Namespace{Adapter: 1<<64 - 1})}
			case reflect.TypeFor[*tier.CorruptError]():
				return []apitest.Maker{val(&tier.CorruptError{Reason: "r"})}
			case reflect.TypeFor[*tier.MismatchError]():
				return []apitest.Maker{val(&tier.MismatchError{What: "key"})}
			}
			return nil
		},
	}
	s.Check(t)
}
