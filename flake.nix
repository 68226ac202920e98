{
  # Development environment and package of the EI eBPF Agent.
  #
  #   nix develop            # clang/llvm 19, bpftool, libbpf, python with the deps, nox, ruff
  #   nix build .#default    # the agent (console script ei-ebpf-agent)
  #
  # The committed pkg/ebpf objects come from the container builder (Containerfile.builder,
  # `nox -s generate`); `nox -s generate -- --local` in this shell uses nixpkgs' clang 19,
  # whose patch level may differ from Debian's, so `--local --check` may report drift here.
  # What is verified where: README.md, "Development".
  description = "EI eBPF Agent: every network flow of a Linux host, counted with eBPF";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      project = (builtins.fromTOML (builtins.readFile ./pyproject.toml)).project;
      # pyproject.toml's dependencies, by nixpkgs attribute name.
      runtimeDeps = ps: [ ps.numpy ps.grpcio ps.protobuf ps.pyroute2 ps.prometheus-client ];
      testDeps = ps: [ ps.pytest ps.grpcio-tools ];
      llvm = pkgs: pkgs.llvmPackages_19;
    in
    {
      packages = forAllSystems (pkgs: rec {
        ei-ebpf-agent = pkgs.python3Packages.buildPythonApplication {
          pname = project.name;
          version = project.version;
          pyproject = true;
          src = self;
          build-system = [ pkgs.python3Packages.hatchling ];
          dependencies = runtimeDeps pkgs.python3Packages;
          # pyproject asks for a newer protobuf runtime than nixpkgs may carry; the generated
          # stubs only need the message API every 4.x+ runtime has.
          pythonRelaxDeps = [ "protobuf" ];
          # libbpf is loaded with ctypes at run time.
          makeWrapperArgs = [ "--prefix" "LD_LIBRARY_PATH" ":" (lib.makeLibraryPath [ pkgs.libbpf ]) ];
          pythonImportsCheck = [ "ei_ebpf_agent" ];
          doCheck = false; # the integration tests need root and network namespaces
          meta = {
            description = project.description;
            license = lib.licenses.asl20;
            mainProgram = "ei-ebpf-agent";
            platforms = lib.platforms.linux;
          };
        };
        default = ei-ebpf-agent;
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (llvm pkgs).clang
            (llvm pkgs).llvm # llvm-strip
            (llvm pkgs).clang-tools # clang-format
            pkgs.bpftools
            pkgs.ruff
            (pkgs.python3.withPackages (ps: runtimeDeps ps ++ testDeps ps ++ [ ps.nox ps.hatchling ]))
          ];
          buildInputs = [ pkgs.libbpf pkgs.linuxHeaders ];
          # The cc wrapper's hardening flags (stack protector, ...) are invalid for -target bpf.
          hardeningDisable = [ "all" ];
          # tools/build_ebpf.py: the tools, and <asm/types.h> (no /usr/include here).
          CLANG = "clang";
          LLVM_STRIP = "llvm-strip";
          ASM_INCLUDE = "${pkgs.linuxHeaders}/include";
        };
      });
    };
}
