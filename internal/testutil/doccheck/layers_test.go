package doccheck

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The floor (the packages directly under internal/) stands on nothing above it: none of its
// files, tests included, imports kvcache or vmm, as docs/architecture.md draws it. Workloads
// live under internal/workload and test helpers under internal/testutil.
func TestFloorImportsNothingAbove(t *testing.T) {
	root := moduleRoot(t)
	entries, err := os.ReadDir(filepath.Join(root, "internal"))
	if err != nil {
		t.Fatal(err)
	}
	floor := 0
	for _, e := range entries {
		if !e.IsDir() || e.Name() == "workload" || e.Name() == "testutil" {
			continue
		}
		floor++
		files, _ := filepath.Glob(filepath.Join(root, "internal", e.Name(), "*.go"))
		for _, f := range files {
			ast, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			for _, imp := range ast.Imports {
				path, _ := strconv.Unquote(imp.Path.Value)
				for _, above := range []string{"/kvcache", "/vmm"} {
					if strings.HasPrefix(path, "github.com/pagedkv/pagedkv") && strings.HasSuffix(path, above) {
						t.Errorf("%s imports %s: the floor must not import what stands on it", f, path)
					}
				}
			}
		}
	}
	if floor < 4 {
		t.Fatalf("found %d floor packages under internal/", floor)
	}
}
