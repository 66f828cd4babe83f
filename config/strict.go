package config

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// The structure check walks the YAML node tree against the yaml tags of
// Config before anything is decoded. yaml.v3's own KnownFields mode stops at
// the first unknown key and does not say where it is nested; this walk
// reports every unknown key, duplicate key and wrongly typed value with its
// full key path. It knows the few Go types Config is made of; adding a field
// of a new kind means adding a case to walk (a test parses a full config, so
// a missing case panics there, not in production).

// inlinePINKeys are keys under which someone might write the PIN itself into
// a member. They get a message that says what to do instead.
var inlinePINKeys = map[string]bool{
	"pin": true, "pin_value": true, "password": true, "passwd": true,
	"user_pin": true, "passphrase": true, "secret": true,
}

var (
	stringListType = reflect.TypeFor[StringList]()
	durationType   = reflect.TypeFor[time.Duration]()
	memberType     = reflect.TypeFor[Member]()
)

type structureChecker struct {
	errs []error
	// done records the (node, type) pairs already walked. An anchored node
	// reached again through aliases is checked once, which keeps the walk
	// linear however the aliases nest, and reports its problems once, under
	// the path where it was first met.
	done map[visit]bool
}

type visit struct {
	n *yaml.Node
	t reflect.Type
}

// checkStructure checks the top-level mapping root against Config and
// returns all problems joined, or nil.
func checkStructure(root *yaml.Node) error {
	c := &structureChecker{done: map[visit]bool{}}
	c.walk(root, reflect.TypeFor[Config](), "")
	return errors.Join(c.errs...)
}

func (c *structureChecker) add(path string, line int, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if line > 0 {
		msg += fmt.Sprintf(" (line %d)", line)
	}
	c.errs = append(c.errs, &problem{path: path, msg: msg})
}

// walk checks that n has the shape of Go type t. Callers skip null values in
// mappings (an absent or empty value keeps the default), so a null that
// reaches walk is a list item left empty, and is an error.
func (c *structureChecker) walk(n *yaml.Node, t reflect.Type, path string) {
	n = resolveAlias(n)
	if n == nil {
		return
	}
	v := visit{n, t}
	if c.done[v] {
		return
	}
	c.done[v] = true

	if n.Kind == yaml.ScalarNode && !strings.HasPrefix(n.ShortTag(), "!!") {
		// A custom tag (!env, !include, ...) would be silently ignored by
		// the decoder; say so instead.
		c.add(path, n.Line, "unsupported YAML tag %s", n.ShortTag())
		return
	}
	if t == stringListType {
		c.stringList(n, path)
		return
	}
	if t == durationType {
		_, err := time.ParseDuration(n.Value)
		c.scalar(n, path, `a duration (like "50ms" or "1m")`, n.Kind == yaml.ScalarNode && n.ShortTag() == "!!str" && err == nil)
		return
	}
	switch t.Kind() {
	case reflect.Pointer:
		c.walk(n, t.Elem(), path)
	case reflect.Struct:
		c.mapping(n, t, path, func(key string) (reflect.Type, bool) {
			return structField(t, key)
		})
	case reflect.Map:
		if t.Key().Kind() != reflect.String {
			panic(fmt.Sprintf("config: structure check: map key type %s", t.Key()))
		}
		c.mapping(n, t, path, func(string) (reflect.Type, bool) {
			return t.Elem(), true
		})
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			c.add(path, n.Line, "expected a list, got %s", describe(n))
			return
		}
		for i, item := range n.Content {
			c.walk(item, t.Elem(), indexKey(path, i))
		}
	case reflect.String:
		c.scalar(n, path, "a string", n.Kind == yaml.ScalarNode && isStringTag(n.ShortTag()))
	case reflect.Int:
		if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!int" {
			var x int
			if err := n.Decode(&x); err != nil {
				c.add(path, n.Line, "integer out of range")
			}
			return
		}
		c.scalar(n, path, "an integer", false)
	case reflect.Bool:
		c.scalar(n, path, "a boolean (true or false)", n.Kind == yaml.ScalarNode && n.ShortTag() == "!!bool")
	default:
		panic(fmt.Sprintf("config: structure check: no case for %s at %s", t, path))
	}
}

func (c *structureChecker) scalar(n *yaml.Node, path, want string, ok bool) {
	if !ok {
		c.add(path, n.Line, "expected %s, got %s", want, describe(n))
	}
}

// isStringTag reports whether a scalar with this tag may fill a string
// field. yaml.v3 stores the text as written for all of these, so "1234" and
// "true" are fine as names and labels; !!binary would be base64-decoded
// behind the reader's back.
func isStringTag(tag string) bool {
	switch tag {
	case "!!str", "!!int", "!!float", "!!bool", "!!timestamp":
		return true
	}
	return false
}

func (c *structureChecker) stringList(n *yaml.Node, path string) {
	switch n.Kind {
	case yaml.ScalarNode:
		c.walk(n, reflect.TypeFor[string](), path)
	case yaml.SequenceNode:
		for i, item := range n.Content {
			c.walk(item, reflect.TypeFor[string](), indexKey(path, i))
		}
	default:
		c.add(path, n.Line, "expected a string or a list of strings, got %s", describe(n))
	}
}

// mapping checks a mapping node whose keys are looked up with field (a
// struct's yaml tags, or any key for a map). t is the Go type, used for
// merge keys and for the member-specific PIN message.
func (c *structureChecker) mapping(n *yaml.Node, t reflect.Type, path string, field func(string) (reflect.Type, bool)) {
	if n.Kind != yaml.MappingNode {
		c.add(path, n.Line, "expected a mapping, got %s", describe(n))
		return
	}
	seen := map[string]int{} // key -> line of its first occurrence
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := resolveAlias(n.Content[i]), n.Content[i+1]
		if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
			c.merge(val, t, path)
			continue
		}
		if k.Kind != yaml.ScalarNode || k.ShortTag() == "!!null" {
			c.add(path, k.Line, "keys must be strings, got %s", describe(k))
			continue
		}
		name := k.Value
		kp := fieldKey(path, name)
		if first, dup := seen[name]; dup {
			c.add(kp, k.Line, "duplicate key (first at line %d)", first)
			continue
		}
		seen[name] = k.Line
		ft, ok := field(name)
		switch {
		case !ok && t == memberType && inlinePINKeys[strings.ToLower(name)]:
			c.add(kp, k.Line, "the HSM PIN must not be inline; use pin_env or pin_file")
		case !ok:
			c.add(kp, k.Line, "unknown key")
		case isNull(val):
			// An absent value: the field keeps its default.
		default:
			c.walk(val, ft, kp)
		}
	}
}

// merge checks the value of a YAML merge key ("<<: *base"), which yaml.v3
// decodes as if the merged mapping's keys were written in place.
func (c *structureChecker) merge(val *yaml.Node, t reflect.Type, path string) {
	val = resolveAlias(val)
	switch val.Kind {
	case yaml.MappingNode:
		c.walk(val, t, path)
	case yaml.SequenceNode:
		for _, item := range val.Content {
			if item = resolveAlias(item); item.Kind != yaml.MappingNode {
				c.add(fieldKey(path, "<<"), item.Line, "merge needs a mapping, got %s", describe(item))
				continue
			}
			c.walk(item, t, path)
		}
	default:
		c.add(fieldKey(path, "<<"), val.Line, "merge needs a mapping or a list of mappings, got %s", describe(val))
	}
}

// structField returns the type of the field of struct t whose yaml key is
// key.
func structField(t reflect.Type, key string) (reflect.Type, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name) // yaml.v3's default key
		}
		if name == key {
			return f.Type, true
		}
	}
	return nil, false
}

// resolveAlias follows an alias to the node it names.
func resolveAlias(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	n = resolveAlias(n)
	return n == nil || (n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null")
}

// describe names the kind of value n holds, for "expected X, got Y". It
// never includes the value itself, which could be a secret.
func describe(n *yaml.Node) string {
	n = resolveAlias(n)
	if n == nil {
		return "nothing"
	}
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.DocumentNode:
		return "a document"
	case yaml.ScalarNode:
		switch tag := n.ShortTag(); tag {
		case "!!null":
			return "no value"
		case "!!str":
			return "a string"
		case "!!int":
			return "an integer"
		case "!!float":
			return "a number that is not an integer"
		case "!!bool":
			return "a boolean"
		case "!!timestamp":
			return "a timestamp"
		default:
			return "a value tagged " + tag
		}
	}
	return "an unexpected YAML node"
}

var plainKey = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// fieldKey appends key to path. A key that is not a plain word is quoted and
// shortened, so a stray line break or a pasted blob cannot garble the
// message.
func fieldKey(path, key string) string {
	if !plainKey.MatchString(key) {
		if len(key) > 64 {
			key = key[:64] + "..."
		}
		key = strconv.Quote(key)
	}
	if path == "" {
		return key
	}
	return path + "." + key
}

func indexKey(path string, i int) string {
	return fmt.Sprintf("%s[%d]", path, i)
}
