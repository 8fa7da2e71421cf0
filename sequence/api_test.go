package sequence

import (
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
)

// TestAPIProperty calls every exported function and method of sequence with extreme
// arguments: nothing panics, every error is typed, and a refused Add or Remove leaves the
// registry as it was.
func TestAPIProperty(t *testing.T) {
	s := &apitest.Suite{
		Dir:   ".",
		Funcs: []any{BlocksFor, NewRegistry, Int32s},
		Types: []any{(*Sequence)(nil), (*Registry)(nil)},
		Values: func(t reflect.Type) []apitest.Maker {
			switch t {
			case reflect.TypeFor[*Registry]():
				return []apitest.Maker{func() apitest.Object {
					r := NewRegistry()
					for _, id := range []ID{1, 3} {
						s, _ := r.Add(id)
						s.Tokens, s.Blocks = 5, append(s.Blocks, Block(id))
					}
					state := func() any {
						m := map[ID]Sequence{}
						r.All(func(s *Sequence) bool {
							m[s.ID] = Sequence{ID: s.ID, Tokens: s.Tokens, Blocks: append([]Block(nil), s.Blocks...)}
							return true
						})
						return m
					}
					return apitest.Object{V: reflect.ValueOf(r), State: state}
				}, func() apitest.Object { return apitest.Object{V: reflect.ValueOf(&Registry{})} }}
			case reflect.TypeFor[*Sequence]():
				return []apitest.Maker{func() apitest.Object {
					return apitest.Object{V: reflect.ValueOf(&Sequence{ID: 1, Tokens: 5, Blocks: []Block{1}})}
				}}
			case reflect.TypeFor[func(*Sequence) bool]():
				return []apitest.Maker{func() apitest.Object { return apitest.Object{V: reflect.ValueOf(func(*Sequence) bool { return true })} }}
			}
			return nil
		},
	}
	s.Check(t)
}
