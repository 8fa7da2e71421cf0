package snippets

import (
	"bufio"
	"bytes"
	"fmt"
	"go/ast"
	"go/importer"
	"go/parser"
	"go/token"
	"go/types"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	// The packages the snippets import. Importing them here makes go test compile them with this
	// binary's flags, so that the go list below finds their export data in the build cache.
	_ "github.com/pagedkv/pagedkv/blocktable"
	_ "github.com/pagedkv/pagedkv/kernels"
	_ "github.com/pagedkv/pagedkv/kvcache"
	_ "github.com/pagedkv/pagedkv/kvevents"
	_ "github.com/pagedkv/pagedkv/ledger"
	_ "github.com/pagedkv/pagedkv/metrics"
	_ "github.com/pagedkv/pagedkv/prefix"
	_ "github.com/pagedkv/pagedkv/tier"
	_ "github.com/pagedkv/pagedkv/tier/disk"
	_ "github.com/pagedkv/pagedkv/tier/redis"
	_ "github.com/pagedkv/pagedkv/vmm"
	_ "github.com/prometheus/client_golang/prometheus"
)

// buildFlags are the flags this test binary was built with that change compiled code: the
// export data go list returns then comes from the same build cache entries.
var buildFlags []string

// imports are the packages a snippet may use without importing them, by the name it uses.
var imports = []string{
	"errors",
	"fmt",
	"time",
	"github.com/pagedkv/pagedkv/blocktable",
	"github.com/pagedkv/pagedkv/kernels",
	"github.com/pagedkv/pagedkv/kvcache",
	"github.com/pagedkv/pagedkv/kvevents",
	"github.com/pagedkv/pagedkv/ledger",
	"github.com/pagedkv/pagedkv/metrics",
	"github.com/pagedkv/pagedkv/prefix",
	"github.com/pagedkv/pagedkv/tier",
	"github.com/pagedkv/pagedkv/tier/disk",
	"github.com/pagedkv/pagedkv/tier/redis",
	"github.com/pagedkv/pagedkv/vmm",
	"github.com/prometheus/client_golang/prometheus",
}

// prelude declares what the snippets assume a runtime has: a device, a manager, its batch, its
// stream. A snippet may declare these again with := (then its own win).
const prelude = `
var (
	dev, gpu0, gpu1 vmm.Device
	m               *kvcache.Manager
	sp              *kvcache.SharedPool
	h               *kvcache.Hybrid
	l               *ledger.Ledger
	cfg, cfgA, cfgB kvcache.Config

	seq, req, victim kvcache.SeqID
	batch            []kvcache.SeqID // the step's sequences, in the order the kernels see them
	newTokens        []int           // for each sequence of batch, its tokens this step
	next             []kvcache.TokenID // for each sequence of batch, the token it sampled
	prompt           []kvcache.TokenID
	cached           int // the tokens StartSequence found
	tenant           string

	slots  []int64 // the step's slot_mapping
	stream kernels.Stream
	err    error

	maxSeqs, maxBlocksPerSeq, maxBlocksInBatch, maxTokens int
	vt                                                    *blocktable.VLLM
	fi                                                    *blocktable.FlashInfer
)
`

// A snippet is one ` + "```go" + ` block of a Markdown file.
type snippet struct {
	file string // relative to the module root
	line int    // of its first line of code
	code string
}

// extract returns the Go blocks of the Markdown file at root/file.
func extract(t *testing.T, root, file string) []snippet {
	data, err := os.ReadFile(filepath.Join(root, file))
	require.NoError(t, err)
	var out []snippet
	var cur *snippet
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		fence := strings.TrimSpace(line)
		switch {
		case cur == nil && fence == "```go":
			cur = &snippet{file: file, line: n + 1}
		case cur != nil && fence == "```":
			out = append(out, *cur)
			cur = nil
		case cur != nil:
			cur.code += line + "\n"
		}
	}
	require.NoError(t, sc.Err())
	require.Nil(t, cur, "%s: a ```go block is never closed", file)
	return out
}

// header is the package clause and the imports every file of the checked package starts with.
func header() string {
	var b strings.Builder
	b.WriteString("package snippets\n\nimport (\n")
	for _, p := range imports {
		fmt.Fprintf(&b, "\t%q\n", p)
	}
	b.WriteString(")\n\n")
	return b.String()
}

// source wraps s as the i-th file of the package: statements go into a function of their own,
// declarations stay at the top level. A //line directive makes errors name the Markdown line.
func (s snippet) source(i int) string {
	if _, err := parser.ParseFile(token.NewFileSet(), "", "package p\n"+s.code, 0); err == nil {
		return fmt.Sprintf("%s//line %s:%d\n%s", header(), s.file, s.line, s.code)
	}
	return fmt.Sprintf("%sfunc snippet%d() {\n//line %s:%d\n%s}\n", header(), i, s.file, s.line, s.code)
}

// exportData returns, for each package the snippets may import and their dependencies, the
// file holding its export data, as the go command built it (offline: the module cache holds
// what this test binary was built from).
func exportData(t *testing.T, root string) map[string]string {
	args := append([]string{"list", "-export", "-deps", "-f", "{{.ImportPath}}\t{{.Export}}"}, buildFlags...)
	cmd := exec.Command("go", append(args, imports...)...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GOPROXY=off")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "go list: %s", stderr.String())
	files := map[string]string{}
	for line := range strings.Lines(string(out)) {
		path, file, _ := strings.Cut(strings.TrimSpace(line), "\t")
		if file != "" {
			files[path] = file
		}
	}
	return files
}

// check type-checks the snippets as one package and returns the errors, each naming the
// Markdown file and line. Variables and imports a snippet leaves unused are not errors: a
// snippet is a fragment of a runtime.
func check(t *testing.T, root string, snippets []snippet) []string {
	files := exportData(t, root)
	fset := token.NewFileSet()
	var parsed []*ast.File
	var errs []string
	add := func(name, src string) {
		f, err := parser.ParseFile(fset, name, src, parser.ParseComments)
		if err != nil {
			errs = append(errs, err.Error())
			return
		}
		parsed = append(parsed, f)
	}
	add("prelude.go", header()+prelude)
	for i, s := range snippets {
		add(fmt.Sprintf("snippet%d.go", i), s.source(i))
	}
	imp := importer.ForCompiler(fset, "gc", func(path string) (io.ReadCloser, error) {
		file, ok := files[path]
		if !ok {
			return nil, fmt.Errorf("no export data for %q", path)
		}
		return os.Open(file)
	})
	conf := types.Config{
		Importer:  imp,
		Sizes:     types.SizesFor("gc", runtime.GOARCH),
		GoVersion: runtime.Version(),
		Error: func(err error) {
			te, ok := err.(types.Error)
			if ok && te.Soft && (strings.Contains(te.Msg, "declared and not used") || strings.Contains(te.Msg, "imported and not used")) {
				return
			}
			errs = append(errs, err.Error())
		},
	}
	_, _ = conf.Check("github.com/pagedkv/pagedkv/internal/testutil/snippets/docs", fset, parsed, nil)
	return errs
}

// Every ```go block of README.md and docs/*.md compiles, with the prelude above as its context.
func TestSnippetsCompile(t *testing.T) {
	root := "../../.."
	docs, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	require.NoError(t, err)
	names := []string{"README.md"}
	for _, d := range docs {
		rel, err := filepath.Rel(root, d)
		require.NoError(t, err)
		names = append(names, rel)
	}
	var snippets []snippet
	for _, name := range names {
		snippets = append(snippets, extract(t, root, name)...)
	}
	require.NotEmpty(t, snippets)
	for _, e := range check(t, root, snippets) {
		t.Error(e)
	}
}

// Every example the docs name (`kvcache.ExampleManager_SwapOut`) exists in that package's tests.
func TestDocsNameExistingExamples(t *testing.T) {
	root := "../../.."
	docs, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	require.NoError(t, err)
	named := regexp.MustCompile("`(\\w+)\\.(Example\\w*)`")
	found := 0
	for _, doc := range append(docs, filepath.Join(root, "README.md")) {
		data, err := os.ReadFile(doc)
		require.NoError(t, err)
		for _, m := range named.FindAllStringSubmatch(string(data), -1) {
			found++
			tests, err := filepath.Glob(filepath.Join(root, m[1], "*_test.go"))
			require.NoError(t, err)
			ok := false
			for _, f := range tests {
				src, err := os.ReadFile(f)
				require.NoError(t, err)
				ok = ok || bytes.Contains(src, []byte("\nfunc "+m[2]+"() {"))
			}
			assert.True(t, ok, "%s names %s.%s, which does not exist", doc, m[1], m[2])
		}
	}
	require.NotZero(t, found)
}

// The test would catch a snippet that stops compiling, and names its Markdown line.
func TestSnippetsCheckFailsOnABrokenSnippet(t *testing.T) {
	broken := []snippet{
		{file: "docs/x.md", line: 10, code: "vt := blocktable.NewVLLM(maxSeqs, maxBlocksPerSeq, -1)\n"},
		{file: "docs/x.md", line: 20, code: "m.NoSuchMethod()\n"},
		{file: "docs/x.md", line: 30, code: "ok, err := m.Len(seq) // unused variables are fine\n"},
	}
	errs := check(t, "../../..", broken)
	require.Len(t, errs, 2, "%q", errs)
	require.True(t, slices.ContainsFunc(errs, func(e string) bool { return strings.HasPrefix(e, "docs/x.md:10:") }), "%q", errs)
	require.True(t, slices.ContainsFunc(errs, func(e string) bool { return strings.HasPrefix(e, "docs/x.md:20:") }), "%q", errs)
}
