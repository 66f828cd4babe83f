package e2e

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestLayoutDoc holds docs/layout.md to the tree: every directory with Go
// code (test-only ones aside) is named in its package table, and every
// file path it names exists.
func TestLayoutDoc(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile(filepath.Join(moduleRoot, "docs", "layout.md"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(doc)
	var missing []string
	err = filepath.WalkDir(moduleRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != moduleRoot && (strings.HasPrefix(name, ".") || name == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		dir, _ := filepath.Rel(moduleRoot, filepath.Dir(path))
		if dir == "." || strings.Contains(text, "`"+dir+"`") || slices.Contains(missing, dir) {
			return nil
		}
		// A sub-package may be named inside its parent's row, by its
		// last element, as hsmpool/internal/p11raw names p11rawtest.
		if strings.Contains(text, "`"+filepath.Base(dir)+"`") && strings.Contains(text, "`"+filepath.Dir(dir)+"`") {
			return nil
		}
		missing = append(missing, dir)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range missing {
		t.Errorf("docs/layout.md does not name the package %s", dir)
	}

	// Paths in backquotes with a slash and a file extension are files.
	for _, m := range regexp.MustCompile("`([a-z0-9_./-]+/[a-z0-9_.-]+\\.(?:go|yaml|json|md|sh))`").FindAllStringSubmatch(text, -1) {
		if _, err := os.Stat(filepath.Join(moduleRoot, m[1])); err != nil {
			t.Errorf("docs/layout.md names %s, which does not exist", m[1])
		}
	}
}
