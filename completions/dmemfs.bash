# bash completion for dmemfs(8)                                -*- shell-script -*-
# Installed as /usr/share/bash-completion/completions/dmemfs.  Completes the
# mount options after -o (names from dmemfs_fuse.host.options.OPTIONS; tests/test_host.py
# checks that every one is offered) and their fixed values.

_dmemfs()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion -n =: || return
    else
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]-}
    fi

    if [[ $prev == -o ]]; then
        # Complete the item after the last comma: a name, or the value after name=.
        local done="" item=$cur
        [[ $cur == *,* ]] && done=${cur%,*}, item=${cur##*,}
        local valued="size= nodes= pagesize= region= passthrough= meta= checkpoint= hugetlbfs= max_alloc_try_dpages= nr_inodes= mode= uid= gid= metrics="
        local flags="start_empty reserve_hugepages private allow_other allow_unlocked debug"
        case $item in
            pagesize=*)
                mapfile -t COMPREPLY < <(compgen -P "${done}pagesize=" -W "4K 2M 1G" -- "${item#*=}") ;;
            region=*)
                mapfile -t COMPREPLY < <(compgen -P "${done}region=" -W "auto hugetlbfs memfd" -- "${item#*=}") ;;
            passthrough=*)
                mapfile -t COMPREPLY < <(compgen -P "${done}passthrough=" -W "auto on off" -- "${item#*=}") ;;
            meta=*)
                mapfile -t COMPREPLY < <(compgen -P "${done}meta=" -W "none" -- "${item#*=}")
                [[ ${item#*=} == /* ]] && mapfile -t COMPREPLY < <(compgen -P "${done}meta=" -f -- "${item#*=}")
                ;;
            hugetlbfs=*)
                mapfile -t COMPREPLY < <(compgen -P "${done}hugetlbfs=" \
                    -W "$(awk '$3 == "hugetlbfs" { print $2 }' /proc/mounts 2>/dev/null)" -- "${item#*=}") ;;
            *=*) ;;
            *)
                mapfile -t COMPREPLY < <(compgen -P "$done" -W "$valued $flags" -- "$item")
                [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *= ]] && compopt -o nospace 2>/dev/null
                ;;
        esac
        # readline replaces only the text after the last '=' or ':' in the word.
        if declare -F _init_completion >/dev/null && [[ $cur == *[=:]* ]]; then
            local keep=${cur%"${cur##*[=:]}"} i
            for i in "${!COMPREPLY[@]}"; do COMPREPLY[i]=${COMPREPLY[i]#"$keep"}; done
        fi
        return
    fi

    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "-o -f --foreground -v --verbose -h --help --version" -- "$cur")
        return
    fi

    # Positionals: [SOURCE] MOUNTPOINT.  SOURCE is ignored (by convention dmemfs or none)
    # and may be left out, so the first word is either; the second is the mountpoint.
    local i npos=0
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -o) ((i++)) ;;
            -*) ;;
            *) ((npos++)) ;;
        esac
    done
    if ((npos < 2)); then
        local -a dirs=()
        if declare -F _filedir >/dev/null; then
            _filedir -d
            dirs=("${COMPREPLY[@]}")
        else
            compopt -o filenames 2>/dev/null
            mapfile -t dirs < <(compgen -d -- "$cur")
        fi
        COMPREPLY=()
        ((npos == 0)) && mapfile -t COMPREPLY < <(compgen -W "dmemfs none" -- "$cur")
        COMPREPLY+=("${dirs[@]}")
    fi
    return 0
} &&
    complete -F _dmemfs dmemfs

# ex: filetype=sh
