# osbuild: man pages, source tarball, RPMs, tests.
#
#   make image    build samples/debian13-qcow2.json into output/ and print how to boot it
#                 (a freshly resolved manifest when a pinned package is gone from the
#                 archive; output/manifest.json is what was built)
#   make man      the man pages, into $(BUILDDIR)/man/ (BUILDDIR defaults to build;
#                 needs rst2man from python3-docutils)
#   make tarball  $(RPMBUILD_DIR)/SOURCES/osbuild-VERSION.tar.gz of the checkout: tracked and
#                 untracked-but-not-ignored files, so it works without committing
#   make spec     $(RPMBUILD_DIR)/SPECS/osbuild.spec: osbuild.spec with the version filled in
#   make rpm      noarch RPMs into $(RPMBUILD_DIR)/RPMS/noarch/ with rpmbuild -bb
#                 (RPMBUILD_DIR, rpmbuild's _topdir, defaults to ./rpmbuild)
#   make srpm     the source RPM into $(RPMBUILD_DIR)/SRPMS/
#   make test     the test suite (python3 -m pytest)
#   make lint     pylint (tools/lint) on the osbuild package, the programs, tools and tests
#   make clean    remove $(BUILDDIR) and $(RPMBUILD_DIR)
#   make version  print the version (defined in osbuild/version.py only)

PYTHON3 ?= python3
# The one place that defines the version is osbuild/version.py.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' osbuild/version.py)
RST2MAN ?= $(shell command -v rst2man || command -v rst2man.py || echo rst2man)
RPMBUILD_DIR ?= $(CURDIR)/rpmbuild
BUILDDIR ?= build
TARBALL := $(RPMBUILD_DIR)/SOURCES/osbuild-$(VERSION).tar.gz
# Off an RPM-based host (e.g. Debian) the BuildRequires cannot be checked.
RPMBUILD_FLAGS ?= $(shell rpm -q rpm >/dev/null 2>&1 || echo --nodeps)

MAN_PAGES := $(BUILDDIR)/man/osbuild.1 $(BUILDDIR)/man/osbuild-manifest.5
PROGRAMS := $(wildcard stages/org.* assemblers/org.* sources/org.*)

.PHONY: all image man tarball spec rpm srpm test lint clean version

all: man

version:
	@echo $(VERSION)

image:
	$(PYTHON3) tools/build-image

man: $(MAN_PAGES)

$(BUILDDIR)/man/osbuild.1: docs/osbuild.1.rst docs/mkman.py osbuild/version.py
	@mkdir -p $(BUILDDIR)/man
	$(PYTHON3) docs/mkman.py --version $(VERSION) docs/osbuild.1.rst > $(BUILDDIR)/man/osbuild.1.rst
	$(RST2MAN) --halt=warning $(BUILDDIR)/man/osbuild.1.rst $@

$(BUILDDIR)/man/osbuild-manifest.5: docs/osbuild-manifest.5.rst docs/mkman.py osbuild/version.py $(PROGRAMS)
	@mkdir -p $(BUILDDIR)/man
	$(PYTHON3) docs/mkman.py --version $(VERSION) --libdir . docs/osbuild-manifest.5.rst \
		> $(BUILDDIR)/man/osbuild-manifest.5.rst
	$(RST2MAN) --halt=warning $(BUILDDIR)/man/osbuild-manifest.5.rst $@

# Files of the checkout: tracked and untracked-but-not-ignored ones that exist.
tarball:
	@test -n "$(VERSION)" || { echo "cannot read the version from osbuild/version.py"; exit 1; }
	@mkdir -p $(RPMBUILD_DIR)/SOURCES
	git ls-files -z --cached --others --exclude-standard \
		| $(PYTHON3) -c 'import os, sys; sys.stdout.write("".join(p + "\0" for p in sys.stdin.read().split("\0") if p and os.path.lexists(p)))' \
		| tar --null --files-from=- --sort=name --owner=0 --group=0 --numeric-owner \
			--transform 's,^,osbuild-$(VERSION)/,S' -czf $(TARBALL)
	@echo "wrote $(TARBALL)"

# The spec gets the version from osbuild/version.py as a %global on its first line.
SPEC := $(RPMBUILD_DIR)/SPECS/osbuild.spec

spec: osbuild.spec osbuild/version.py
	@mkdir -p $(RPMBUILD_DIR)/SPECS
	sed -e '1i %global osbuild_version $(VERSION)' osbuild.spec > $(SPEC)

rpm: tarball spec
	rpmbuild -bb $(RPMBUILD_FLAGS) --define "_topdir $(RPMBUILD_DIR)" $(SPEC)
	@ls -1 $(RPMBUILD_DIR)/RPMS/noarch/*-$(VERSION)-*.rpm

srpm: tarball spec
	rpmbuild -bs $(RPMBUILD_FLAGS) --define "_topdir $(RPMBUILD_DIR)" $(SPEC)

test:
	$(PYTHON3) -m pytest

lint:
	$(PYTHON3) tools/lint

clean:
	rm -rf $(BUILDDIR) $(RPMBUILD_DIR)
