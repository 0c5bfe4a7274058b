# bash completion for dmemfs-hugepages(8)                      -*- shell-script -*-
# Installed as /usr/share/bash-completion/completions/dmemfs-hugepages.

_dmemfs_hugepages()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion || return
    else
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]-}
    fi
    case $prev in
        --config | --state)
            if declare -F _filedir >/dev/null; then
                _filedir
            else
                compopt -o filenames 2>/dev/null
                mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            fi
            return
            ;;
    esac
    local i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            reserve | release | status) return ;;
        esac
    done
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "--config --state -h --help --version" -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -W "reserve release status" -- "$cur")
    fi
} &&
    complete -F _dmemfs_hugepages dmemfs-hugepages

# ex: filetype=sh
