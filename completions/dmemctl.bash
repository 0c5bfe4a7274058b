# bash completion for dmemctl(8)                               -*- shell-script -*-
# Installed as /usr/share/bash-completion/completions/dmemctl, where bash-completion
# loads it on first use.  It also works when sourced without bash-completion, except
# for completing after ':' (bind:<TAB>), which needs bash-completion's word handling.
# Keep in step with dmemctl.build_parser(); tests/test_host.py checks every subcommand
# and option named there is offered here.

_dmemctl_mounts()
{
    awk '$3 == "fuse.dmemfs" { print $2 }' /proc/mounts 2>/dev/null
}

# Pool names in the default layout are node numbers, exactly as numactl names nodes.
_dmemctl_nodes()
{
    local d
    for d in /sys/devices/system/node/node[0-9]*; do
        [[ -d $d ]] && printf '%s\n' "${d##*/node}"
    done
}

_dmemctl_files()
{
    if declare -F _filedir >/dev/null; then
        _filedir "$@"
    else
        compopt -o filenames 2>/dev/null
        if [[ ${1-} == -d ]]; then
            mapfile -t COMPREPLY < <(compgen -d -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        fi
    fi
}

_dmemctl_policies()
{
    local nodes first last
    nodes=$(_dmemctl_nodes)
    case $cur in
        bind:* | preferred:*)
            local prefix=${cur%%:*}: taken=${cur#*:}
            # bind:0,1 takes a list: complete the entry after the last comma.
            [[ $prefix == bind: && $taken == *,* ]] && prefix+=${taken%,*},
            mapfile -t COMPREPLY < <(compgen -P "$prefix" -W "$nodes" -- "${cur#"$prefix"}")
            ;;
        interleave:*)
            first=$(head -n1 <<<"$nodes")
            last=$(tail -n1 <<<"$nodes")
            local ranges=$nodes
            [[ $first != "$last" ]] && ranges+=$'\n'"$first-$last"
            mapfile -t COMPREPLY < <(compgen -P interleave: -W "$ranges" -- "${cur#interleave:}")
            ;;
        *)
            mapfile -t COMPREPLY < <(compgen -W "local bind: preferred: interleave:" -- "$cur")
            [[ ${COMPREPLY[0]-} == *: ]] && compopt -o nospace 2>/dev/null
            ;;
    esac
    if declare -F __ltrim_colon_completions >/dev/null; then
        __ltrim_colon_completions "$cur"
    fi
}

_dmemctl()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion -n : || return
    else
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]-}
    fi

    local global_opts="-h --help -m --mount --json --version"
    local commands="status extents policy files trace map poison scan"

    # The subcommand is the first word that is neither an option nor -m's value;
    # nargs counts the positional words after it.
    local i cmd="" nargs=0
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -m | --mount | -n | --limit | --png) ((i++)) ;;
            -*) ;;
            *)
                if [[ -z $cmd ]]; then cmd=${words[i]}; else ((nargs++)); fi
                ;;
        esac
    done

    case $prev in
        -m | --mount)
            mapfile -t COMPREPLY < <(compgen -W "$(_dmemctl_mounts)" -- "$cur")
            ((${#COMPREPLY[@]})) || _dmemctl_files -d
            return
            ;;
        -n | --limit)
            return
            ;;
        --png)
            _dmemctl_files png
            return
            ;;
    esac

    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$global_opts" -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -W "$commands" -- "$cur")
        fi
        return
    fi

    if [[ $cur == -* ]]; then
        # The global options work after the command too.
        local opts="-h --help -m --mount --json"
        case $cmd in
            files) opts+=" -n --limit" ;;
            map) opts+=" --png" ;;
            poison) opts+=" --kernel" ;;
        esac
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
        return
    fi

    case $cmd in
        extents)
            ((nargs == 0)) && _dmemctl_files
            ;;
        policy)
            if ((nargs == 0)); then
                _dmemctl_files
            elif ((nargs == 1)); then
                _dmemctl_policies
            fi
            ;;
        trace)
            ((nargs == 0)) && mapfile -t COMPREPLY < <(compgen -W "on off" -- "$cur")
            ;;
        poison)
            # OFFSET or FILE:OFFSET: offer the files; the offset is typed.
            ((nargs == 0)) && _dmemctl_files
            ;;
    esac
    return 0
} &&
    complete -F _dmemctl dmemctl

# ex: filetype=sh
