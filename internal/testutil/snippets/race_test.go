//go:build race

package snippets

func init() { buildFlags = append(buildFlags, "-race") }
