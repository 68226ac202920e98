# The pinned builder of pkg/ebpf/*.o: `nox -s generate` builds this image and runs
# tools/build_ebpf.py in it (tools/generate.py). Only the distribution's package manager
# downloads anything here.
#
# What is pinned, and how:
# - The toolchain that shapes the objects: the exact Debian versions of clang-19, llvm-19
#   (llvm-strip) and libbpf-dev (the ARGs below). A version that has left the archive makes
#   the build fail loudly; bump it, run `nox -s generate`, commit the new objects.
# - The base: by registry digest where the engine can pull it (the default below, Debian's
#   official bookworm image). Machines without registry access create a stand-in with
#   tools/make_base_image.py (debootstrap -> import, localhost/ei-debian-base:bookworm);
#   an imported image has no registry digest, so tools/generate.py passes it here by its
#   image id (BUILDER_BASE=sha256:...), and BUILD-INFO.json records that id.
#
# Fedora alternative (not tested by CI; unversioned clang/llvm of that release):
#   --build-arg BUILDER_BASE=registry.fedoraproject.org/fedora:41@sha256:<digest>
ARG BUILDER_BASE=docker.io/library/debian:bookworm-20250721-slim@sha256:2424c1850714a4d94666ec928e24d86de958646737b1d113f5b2207be44d37d8
FROM ${BUILDER_BASE}

ARG CLANG_VERSION=1:19.1.7-3~deb12u1
ARG LIBBPF_VERSION=1:1.1.2-0+deb12u1

RUN set -eu; \
    if command -v apt-get >/dev/null; then \
        export DEBIAN_FRONTEND=noninteractive; \
        apt-get update -qq; \
        apt-get install -y -qq --no-install-recommends \
            "clang-19=${CLANG_VERSION}" "llvm-19=${CLANG_VERSION}" \
            "libbpf-dev=${LIBBPF_VERSION}" bpftool python3 make; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/*; \
    elif command -v dnf >/dev/null; then \
        dnf install -y --setopt=install_weak_deps=False \
            clang llvm libbpf-devel bpftool python3 make kernel-headers glibc-devel; \
        dnf clean all; \
    else \
        echo "BUILDER_BASE must have apt-get (Debian) or dnf (Fedora)" >&2; exit 1; \
    fi

ENV PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
CMD ["python3", "tools/build_ebpf.py"]
